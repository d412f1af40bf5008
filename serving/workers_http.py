"""HTTP/1.1 on one blocking socket for `serving.workers.ConnectionThreadWorker`: llhttp (the C
parser of `httptools`) reads the requests, a WSGI environ is built from its callbacks, and a
response leaves in one send() when the app answers with a body of known length.

It stands in for gunicorn's `Request` / `Unreader` / `Body` / `wsgi.create` / `Response`
stack, whose Python costs ~200 us of CPU a request on this machine (GET /healthz), and keeps
their behaviour: the same environ keys, the same response framing and default headers
(`Server`, `Date`, `Connection`, chunked when an HTTP/1.1 answer has no length), gunicorn's
header policy (`HeaderPolicy._apply_header_policy`: singleton fields, `Expect`, trusted
secure-scheme headers, header names with underscores), its limits (`limit_request_line`,
`limit_request_fields`, `limit_request_field_size`) and its error answers
(`Worker.handle_error`). llhttp rejects what gunicorn's parser rejects (obsolete line
folding, CL + TE, bad chunk framing, control characters) with a 400, and also methods it does
not know (gunicorn passes any upper-case token to the app).

Request bodies are read as the app reads `wsgi.input` (Content-Length or chunked, decoded by
llhttp); what the app leaves unread is drained (bounded) before the next request. Pipelined
requests are answered in order.
"""

from __future__ import annotations

import os
import time
from collections import deque
from email.utils import formatdate
from typing import Any

import httptools
from gunicorn import SERVER, SERVER_SOFTWARE, util
from gunicorn.http.errors import (
    ConfigurationProblem,
    InvalidHeader,
    InvalidHeaderName,
    InvalidRequestLine,
    LimitRequestHeaders,
    LimitRequestLine,
    UnsupportedTransferCoding,
)
from gunicorn.http.message import (
    MAX_HEADERS,
    MAX_REQUEST_LINE,
    RFC9110_5_3_SINGLETON_FIELDS,
    TOKEN_RE,
    HeaderPolicy,
)
from gunicorn.http.wsgi import HEADER_VALUE_RE, FileWrapper, WSGIErrorsWrapper

#: Bytes asked of recv() at a time.
RECV_BYTES = 65536
#: Longest the worker reads (and drops) a body the app left unread before the next request.
DRAIN_S = 5.0
_HOP_HEADERS = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailers",
        "transfer-encoding",
        "upgrade",
    }
)
CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
#: Request header names `HeaderPolicy._apply_header_policy` acts on (with the trusted
#: secure-scheme and forwarder headers, and any name holding "_"); TRANSFER-ENCODING for
#: `Connection._transfer_coding`.
_POLICY_NAMES = RFC9110_5_3_SINGLETON_FIELDS | {"EXPECT", "TRANSFER-ENCODING"}
#: Header names as sent -> upper-case str (bounded), so a repeated name is decoded once.
_NAMES: dict[bytes, str] = {}


class ClientGone(Exception):
    """The client closed the connection (or it broke) in the middle of a request."""


class BadRequest(Exception):
    """llhttp refused the bytes (gunicorn answers these with a 400 too)."""


class Request(HeaderPolicy):
    """One parsed request: what gunicorn's `Request` offers the hooks and the access log
    (method, uri, path, query, version, headers as (UPPER-NAME, value))."""

    __slots__ = (
        "cfg",
        "peer_addr",
        "scheme",
        "version",
        "method",
        "uri",
        "path",
        "query",
        "fragment",
        "headers",
        "raw",
        "chunks",
        "complete",
        "chunked",
        "must_close",
        "_expected_100_continue",
        "body",
    )

    def __init__(self, cfg, peer_addr, scheme: str) -> None:
        self.cfg = cfg
        self.peer_addr = peer_addr
        self.scheme = scheme
        self.version = (1, 1)
        self.method = ""
        self.uri = b""
        self.path = self.query = self.fragment = ""
        self.headers: list[tuple[str, str]] = []
        self.raw: list[tuple[bytes, bytes]] = []
        self.chunks: list[bytes] = []
        self.complete = False
        self.chunked = False
        self.must_close = False
        self._expected_100_continue = False
        self.body: Body | None = None

    def should_close(self) -> bool:  # gunicorn's Message.should_close
        if self.must_close:
            return True
        for h, v in self.headers:
            if h == "CONNECTION":
                v = v.lower().strip(" \t")
                if v == "close":
                    return True
                if v == "keep-alive":
                    return False
                break
        return self.version <= (1, 0)


class Connection:
    """A client connection: llhttp's callbacks fill `ready` with requests whose headers are
    complete (their bodies may still be arriving)."""

    def __init__(self, worker, sock, addr, server) -> None:
        cfg = worker.cfg
        self.worker = worker
        self.cfg = cfg
        self.sock = sock
        self.addr = addr
        self.server = server
        self.scheme = "https" if cfg.is_ssl else "http"
        line = cfg.limit_request_line
        self.limit_line = MAX_REQUEST_LINE if line < 0 or line >= MAX_REQUEST_LINE else line
        if self.limit_line == 0:
            self.limit_line = 1 << 20
        fields = cfg.limit_request_fields
        self.limit_fields = MAX_HEADERS if fields <= 0 or fields > MAX_HEADERS else fields
        self.limit_field = cfg.limit_request_field_size
        if self.limit_field <= 0:
            self.limit_field = 8190
        # bytes a request's head may take before it is refused (gunicorn's max_buffer_headers)
        self.limit_head = self.limit_line + self.limit_fields * (self.limit_field + 2) + 4
        self.parser = httptools.HttpRequestParser(self)
        self.ready: deque[Request] = deque()
        self.cur: Request | None = None
        self.in_head = False
        self.head_bytes = 0
        self.upgraded = False
        self.broken = False
        self.deferred: Exception | None = None
        self._trusted: tuple | None = None

    # -- llhttp callbacks
    def on_message_begin(self) -> None:
        self.cur = Request(self.cfg, self.addr, self.scheme)
        self.in_head = True

    def on_url(self, url: bytes) -> None:
        req = self.cur
        req.uri += url
        if len(req.uri) > self.limit_line:
            raise LimitRequestLine(len(req.uri), self.limit_line)

    def on_header(self, name: bytes, value: bytes) -> None:
        raw = self.cur.raw
        if len(raw) >= self.limit_fields:
            raise LimitRequestHeaders("limit request headers fields")
        if len(name) + len(value) + 4 > self.limit_field:
            raise LimitRequestHeaders("limit request headers fields size")
        raw.append((name, value))

    def on_headers_complete(self) -> None:
        req = self.cur
        parser = self.parser
        self.in_head = False
        self.head_bytes = 0
        method = req.method = parser.get_method().decode("latin-1")
        uri = req.uri.decode("latin-1")
        if len(method) + len(uri) + 10 > self.limit_line:
            raise LimitRequestLine(len(method) + len(uri) + 10, self.limit_line)
        req.uri = uri
        major, _, minor = parser.get_http_version().partition(".")
        req.version = version = (int(major), int(minor))
        if self.cfg.casefold_http_method:
            req.method = method.upper()
        if not uri:
            raise InvalidRequestLine(f"{method}  HTTP/{major}.{minor}")
        if uri[0] == "/" and uri[:2] != "//" and "#" not in uri:
            path, _, req.query = uri.partition("?")
            req.path = path
        else:
            if (uri == "*" and method != "OPTIONS") or (
                method != "CONNECT" and uri != "*" and uri[0] != "/" and "://" not in uri
            ):
                raise InvalidRequestLine(f"{method} {uri} HTTP/{major}.{minor}")
            try:
                parts = util.split_request_uri(uri)
            except ValueError:
                raise InvalidRequestLine(f"{method} {uri} HTTP/{major}.{minor}") from None
            req.path, req.query, req.fragment = (
                parts.path or "",
                parts.query or "",
                parts.fragment or "",
            )
        if self._trusted is None:
            secure, forwarders = self._trusted = req._peer_trusted_for_forwarded()
            # names the header policy acts on; any other name (without "_") is kept as it is
            self._policy_names = _POLICY_NAMES | set(secure) | set(forwarders)
        secure, forwarders = self._trusted
        policy_names = self._policy_names
        scheme_state = [False]
        seen: set[str] = set()
        headers = req.headers
        names = _NAMES
        for raw_name, raw_value in req.raw:
            name = names.get(raw_name)
            if name is None:
                name = raw_name.decode("latin-1").upper()
                if len(names) < 1024:
                    names[raw_name] = name
            value = raw_value.decode("latin-1").strip(" \t")
            if name in policy_names or "_" in name:
                kept = req._apply_header_policy(name, value, scheme_state, seen, secure, forwarders)
                if kept is None:
                    continue
                if name == "TRANSFER-ENCODING":
                    self._transfer_coding(req, value)
                headers.append(kept)
            else:
                headers.append((name, value))
        req.raw = []
        if req.chunked and version < (1, 1):
            raise InvalidHeader("TRANSFER-ENCODING", req=req)
        self.ready.append(req)

    @staticmethod
    def _transfer_coding(req: Request, value: str) -> None:
        """gunicorn's rules for Transfer-Encoding (`Message.set_body_reader`)."""
        for val in (v.strip().lower() for v in value.split(",")):
            if val == "chunked":
                if req.chunked:
                    raise InvalidHeader("TRANSFER-ENCODING", req=req)
                req.chunked = True
            elif val == "identity":
                if req.chunked:
                    raise InvalidHeader("TRANSFER-ENCODING", req=req)
            elif val in ("compress", "deflate", "gzip"):
                if req.chunked:
                    raise InvalidHeader("TRANSFER-ENCODING", req=req)
                req.must_close = True
            else:
                raise UnsupportedTransferCoding(value)

    def on_body(self, body: bytes) -> None:
        req = self.cur
        if req.body is None or not req.body.dropping:
            req.chunks.append(body)

    def on_message_complete(self) -> None:
        self.cur.complete = True
        self.cur = None

    # -- reading
    def feed(self) -> None:
        """Read once from the socket and parse it; ClientGone at the end of the stream. After
        an error the connection is `broken`: it closes after the answer in progress. An error
        in a request pipelined after the one being read (whose bytes came in the same piece)
        is held back and raised when that request is due, after the earlier ones' answers."""
        if self.deferred is not None:
            raise self.deferred
        try:
            self._feed()
        except Exception as e:
            if self.ready and self.cur is not self.ready[0]:
                self.deferred = e
                return
            self.broken = True
            raise
        except BaseException:
            self.broken = True
            raise

    def _feed(self) -> None:
        data = self.sock.recv(RECV_BYTES)
        if not data:
            raise ClientGone()
        if self.upgraded:  # bytes after an upgrade request: not HTTP/1 any more
            return
        if self.in_head or self.cur is None:
            self.head_bytes += len(data)
            if self.head_bytes > self.limit_head:
                raise LimitRequestHeaders("limit request headers fields size")
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserCallbackError as e:
            raise (e.__context__ or e) from None
        except httptools.HttpParserUpgrade:
            self.upgraded = True  # served as a plain request, then the connection closes
            if self.ready:
                self.ready[-1].must_close = True
                self.ready[-1].complete = True
        except httptools.HttpParserError as e:
            raise BadRequest(str(e)) from None

    def next_request(self) -> Request:
        """The next request whose head has arrived (ClientGone when the client is done)."""
        ready = self.ready
        while not ready:
            if self.upgraded:
                raise ClientGone()
            self.feed()
        return ready[0]

    def finish(self, req: Request, deadline: float) -> bool:
        """Read and drop the rest of `req`'s body; whether that ended in time."""
        if req.body is not None:
            req.body.dropping = True
        req.chunks = []
        while not req.complete:
            if time.monotonic() > deadline:
                return False
            self.feed()
            req.chunks = []
        return True


class Body:
    """`wsgi.input`: the request body, read from the connection as the app asks for it."""

    __slots__ = ("conn", "req", "buf", "dropping")

    def __init__(self, conn: Connection, req: Request) -> None:
        self.conn = conn
        self.req = req
        self.buf = b""
        self.dropping = False

    def _fill(self, size: int) -> None:
        """Read until `buf` holds `size` bytes (all of the body when size < 0) or the body
        ends; the pieces are joined once."""
        req = self.req
        have = len(self.buf) + sum(map(len, req.chunks))
        while not req.complete and (size < 0 or have < size):
            seen = len(req.chunks)
            self.conn.feed()
            have += sum(map(len, req.chunks[seen:]))
        if req.chunks:
            self.buf = b"".join([self.buf, *req.chunks]) if self.buf else b"".join(req.chunks)
            req.chunks = []

    def read(self, size: int | None = -1) -> bytes:
        if size is None or size < 0:
            self._fill(-1)
            data, self.buf = self.buf, b""
            return data
        if size == 0:
            return b""
        req = self.req
        chunks = req.chunks
        if not self.buf and req.complete and len(chunks) == 1 and len(chunks[0]) <= size:
            req.chunks = []  # the whole body arrived in one piece
            return chunks[0]
        self._fill(size)
        data, self.buf = self.buf[:size], self.buf[size:]
        return data

    def readline(self, size: int | None = -1) -> bytes:
        while True:
            idx = self.buf.find(b"\n")
            limit = size if size is not None and size >= 0 else None
            if idx >= 0 or (limit is not None and len(self.buf) >= limit):
                break
            if self.req.complete and not self.req.chunks:
                break
            self._fill(len(self.buf) + 1)
        end = idx + 1 if idx >= 0 else len(self.buf)
        if limit is not None:
            end = min(end, limit)
        data, self.buf = self.buf[:end], self.buf[end:]
        return data

    def readlines(self, hint: int | None = None) -> list[bytes]:
        out, total = [], 0
        while True:
            line = self.readline()
            if not line:
                return out
            out.append(line)
            total += len(line)
            if hint is not None and 0 < hint <= total:
                return out

    def __iter__(self):
        return self

    def __next__(self) -> bytes:
        line = self.readline()
        if not line:
            raise StopIteration
        return line


#: Response header names already checked against TOKEN_RE -> lower case (bounded).
_RESPONSE_NAMES: dict[str, str] = {}
_date = [0, ""]


def http_date() -> str:
    """`Date` header value, formatted once a second."""
    now = int(time.time())
    if _date[0] != now:
        _date[0], _date[1] = now, formatdate(now, usegmt=True)
    return _date[1]


class Response:
    """gunicorn's `Response` framing (status line, Server/Date/Connection, Content-Length or
    chunked, no body for HEAD/1xx/204/304), with the head held back until the first body
    bytes so that a small answer leaves in one send()."""

    __slots__ = (
        "req",
        "sock",
        "status",
        "status_code",
        "headers",
        "response_length",
        "chunked",
        "sent",
        "headers_sent",
        "must_close",
        "omits_body",
        "upgrade",
        "_head",
    )

    def __init__(self, req: Request, sock) -> None:
        self.req = req
        self.sock = sock
        self.status: str | None = None
        self.status_code: int | None = None
        self.headers: list[tuple[str, str]] = []
        self.response_length: int | None = None
        self.chunked = False
        self.sent = 0
        self.headers_sent = False
        self.must_close = False
        self.omits_body = False
        self.upgrade = False
        self._head: bytes | None = None

    def force_close(self) -> None:
        self.must_close = True

    def should_close(self) -> bool:
        if self.must_close or self.req.should_close():
            return True
        if self.response_length is not None or self.chunked:
            return False
        if self.req.method == "HEAD":
            return False
        code = self.status_code
        return not (code is not None and (code < 200 or code in (204, 304)))

    def start_response(self, status: str, headers, exc_info=None):
        if exc_info:
            try:
                if self.status and self.headers_sent:
                    util.reraise(exc_info[0], exc_info[1], exc_info[2])
            finally:
                exc_info = None
        elif self.status is not None:
            raise AssertionError("Response headers already set!")
        self.status = status
        try:
            self.status_code = code = int(status.split()[0])
        except ValueError:
            self.status_code = code = None
        kept = self.headers = []
        names_ok = _RESPONSE_NAMES
        length = None
        for name, value in headers:
            lname = names_ok.get(name)
            if lname is None:
                if type(name) is not str:
                    raise TypeError(f"{name!r} is not a string")
                if not TOKEN_RE.fullmatch(name):
                    raise InvalidHeaderName(f"{name!r}")
                lname = name.lower()
                if len(names_ok) < 1024:
                    names_ok[name] = lname
            if type(value) is not str:
                raise TypeError(f"{value!r} is not a string")
            if not HEADER_VALUE_RE.fullmatch(value):
                raise InvalidHeader(f"{value!r}")
            value = value.strip(" \t")
            if lname == "content-length":
                length = int(value)
            elif lname in _HOP_HEADERS:
                if lname == "connection" and value.lower() == "upgrade":
                    self.upgrade = True
                elif lname == "upgrade" and value.lower() == "websocket":
                    kept.append((name, value))
                continue
            kept.append((name, value))
        method = self.req.method
        omits = self.omits_body = (
            method == "HEAD" or code in (204, 304) or (code is not None and 100 <= code < 200)
        )
        if omits and (code == 204 or (code is not None and 100 <= code < 200)):
            self.headers = [(k, v) for k, v in kept if k.lower() != "content-length"]
            length = None
        self.response_length = length
        self.chunked = length is None and self.req.version > (1, 0) and not omits
        return self.write

    def _build_head(self) -> bytes:
        if self.upgrade:
            connection = "upgrade"
        elif self.should_close():
            connection = "close"
        else:
            connection = "keep-alive"
        major, minor = self.req.version
        lines = [
            f"HTTP/{major}.{minor} {self.status}\r\nServer: {SERVER}\r\nDate: {http_date()}\r\n"
            f"Connection: {connection}\r\n"
        ]
        if self.chunked:
            lines.append("Transfer-Encoding: chunked\r\n")
        lines.extend([f"{k}: {v}\r\n" for k, v in self.headers])
        lines.append("\r\n")
        self.headers_sent = True
        return "".join(lines).encode("latin-1")

    def send_headers(self) -> None:
        if not self.headers_sent:
            self._head = self._build_head()

    def _body_bytes(self, arg: bytes) -> bytes:
        """`arg` cut to what may still be sent, framed (b"" when nothing is to be sent)."""
        if type(arg) is not bytes and not isinstance(arg, bytes):
            raise TypeError(f"{arg!r} is not a byte")
        if self.omits_body:
            return b""
        n = len(arg)
        if self.response_length is not None:
            if self.sent >= self.response_length:
                return b""
            if self.sent + n > self.response_length:
                arg = arg[: self.response_length - self.sent]
                n = len(arg)
        if self.chunked:
            if n == 0:
                return b""
            self.sent += n
            return b"%X\r\n%s\r\n" % (n, arg)
        self.sent += n
        return arg

    def write(self, arg: bytes) -> None:
        """The WSGI write(): the head (if not yet out) and `arg`, in one send."""
        if not self.headers_sent:
            self._head = self._build_head()
        data = self._body_bytes(arg)
        head, self._head = self._head, None
        if head:
            data = head + data
        if data:
            self.sock.sendall(data)

    def finish(self, last: bytes = b"") -> None:
        """Send `last` (body bytes), whatever head is still held and the end of a chunked
        body, in one send."""
        if not self.headers_sent:
            self._head = self._build_head()
        data = self._body_bytes(last) if last else b""
        head, self._head = self._head, None
        if head:
            data = head + data
        if self.chunked:
            data += b"0\r\n\r\n"
        if data:
            self.sock.sendall(data)

    def early_hints(self, headers) -> None:
        """`wsgi.early_hints`: a 103 before the answer (HTTP/1.1 clients only)."""
        if self.headers_sent or self.req.version < (1, 1):
            return
        out = ["HTTP/1.1 103 Early Hints\r\n"]
        for name, value in headers:
            if isinstance(name, bytes):
                name = name.decode("latin-1")
            if isinstance(value, bytes):
                value = value.decode("latin-1")
            if not TOKEN_RE.fullmatch(name):
                raise InvalidHeaderName(f"{name!r}")
            if not HEADER_VALUE_RE.fullmatch(value):
                raise InvalidHeader(f"{name!r}")
            value = value.strip(" \t")
            out.append(f"{name}: {value}\r\n")
        out.append("\r\n")
        self.sock.sendall("".join(out).encode("latin-1"))


class EnvironBuilder:
    """The WSGI environ of a request, as `gunicorn.http.wsgi.create` builds it."""

    def __init__(self, cfg) -> None:
        self.cfg = cfg
        self.base = {
            "wsgi.errors": WSGIErrorsWrapper(cfg),
            "wsgi.version": (1, 0),
            "wsgi.multithread": True,
            "wsgi.multiprocess": cfg.workers > 1,
            "wsgi.run_once": False,
            "wsgi.file_wrapper": FileWrapper,
            "wsgi.input_terminated": True,
            "SERVER_SOFTWARE": SERVER_SOFTWARE,
        }
        self.script_name = os.environ.get("SCRIPT_NAME", "")

    def build(self, conn: Connection, req: Request, resp: Response) -> dict[str, Any]:
        environ = self.base.copy()
        major, minor = req.version
        environ["wsgi.input"] = req.body
        environ["gunicorn.socket"] = conn.sock
        environ["REQUEST_METHOD"] = req.method
        environ["QUERY_STRING"] = req.query
        environ["RAW_URI"] = req.uri
        environ["SERVER_PROTOCOL"] = f"HTTP/{major}.{minor}"
        host = None
        script_name = self.script_name
        for name, value in req.headers:
            if name == "HOST":
                host = value
            elif name == "SCRIPT_NAME":
                script_name = value
            elif name == "CONTENT-TYPE":
                environ["CONTENT_TYPE"] = value
                continue
            elif name == "CONTENT-LENGTH":
                environ["CONTENT_LENGTH"] = value
                continue
            key = "HTTP_" + name.replace("-", "_")
            if key in environ:
                value = f"{environ[key]},{value}"
            environ[key] = value
        environ["wsgi.url_scheme"] = req.scheme
        client = conn.addr
        if isinstance(client, str):
            environ["REMOTE_ADDR"] = client
        elif isinstance(client, bytes):
            environ["REMOTE_ADDR"] = client.decode()
        else:
            environ["REMOTE_ADDR"] = client[0]
            environ["REMOTE_PORT"] = str(client[1])
        server = conn.server
        if isinstance(server, str):
            server = server.split(":")
            if len(server) == 1:
                if host:
                    server = host.split(":")
                    if len(server) == 1:
                        server.append({"http": 80, "https": 443}.get(req.scheme, ""))
                else:
                    server.append("")
        environ["SERVER_NAME"] = server[0]
        environ["SERVER_PORT"] = str(server[1])
        path = req.path
        if script_name:
            if not path.startswith(script_name):
                raise ConfigurationProblem(
                    f"Request path {path!r} does not start with SCRIPT_NAME {script_name!r}"
                )
            path = path[len(script_name) :]
        environ["PATH_INFO"] = util.unquote_to_wsgi_str(path) if "%" in path else path
        environ["SCRIPT_NAME"] = script_name
        environ["wsgi.early_hints"] = resp.early_hints
        return environ
