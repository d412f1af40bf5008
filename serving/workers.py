"""A gunicorn worker with one thread per keep-alive connection, for event collection.

    gunicorn serving.wsgi:app --worker-class serving.workers.ConnectionThreadWorker --threads 64

gunicorn's gthread worker hands every request of a keep-alive connection from its poller
thread to a pool thread and back (epoll unregister/register, a pipe write and read, two
thread wake-ups with the GIL): ~150-290 us of worker CPU a request, three times the event
route itself. Here a thread accepts a connection and serves it until the client closes it,
it idles for `--keep-alive` seconds, or the worker stops: a request costs one wake-up (its
data arriving). Concurrent event posts still share one validation pass and one fsync (the
event log's group commit collects the threads that are waiting).

Each thread serves one connection at a time, so `--threads` bounds the connections a worker
holds open; a connection beyond all workers' threads waits in the listen backlog until a
thread is free: an idle one frees itself after `--keep-alive` seconds, and while every thread
is taken and a connection waits, each answer closes its connection (the client reconnects),
so kept-alive clients cannot starve new ones. One free thread per
process waits in accept() at a time, so a burst of new connections is shared by the workers
(64 connections over 2 booted workers: 23-27 / 37-41, against up to 1 / 63 with every free
thread in accept()). HTTP/1.1 only (like the sync worker).

HTTP is read by llhttp (httptools) and answered by `serving.workers_http`, not by gunicorn's
Python `Request`/`Response`: the same environ, framing, header policy, limits and error
answers (tests/serving/test_serving_worker_http.py compares the bytes with the sync worker's)
at ~160 instead of ~280 us of server CPU per single event (events_ingest.py, load 1.5).
"""

from __future__ import annotations

import errno
import os
import select
import socket
import ssl
import struct
import threading
import time
from datetime import datetime

from gunicorn import sock, util
from gunicorn.http.errors import InvalidRequestLine
from gunicorn.workers import base

from serving.workers_http import (
    CONTINUE,
    DRAIN_S,
    BadRequest,
    Body,
    ClientGone,
    Connection,
    EnvironBuilder,
    Request,
    Response,
)

#: Seconds a thread waits in accept() before it looks at `alive` again.
_ACCEPT_POLL_S = 1.0


class ConnectionThreadWorker(base.Worker):
    """`--threads` threads per process, each accepting and serving one connection at a time
    (keep-alive); the main thread only heartbeats and handles signals."""

    def run(self) -> None:
        self._environ = EnvironBuilder(self.cfg)
        self._access_log = self.log.access_log_enabled
        if self.cfg.proxy_protocol != "off":
            self.log.warning("The PROXY protocol is not supported by this worker; ignored.")
        if "h2" in self.cfg.http_protocols:
            self.log.warning("HTTP/2 is not supported by this worker; serving HTTP/1.1 only.")
        for listener in self.sockets:
            listener.settimeout(_ACCEPT_POLL_S)
        acceptors = [threading.Lock() for _ in self.sockets]
        # free threads per listener: with none, a waiting connection takes a kept-alive one's
        self._free = {listener.fileno(): max(1, self.cfg.threads) for listener in self.sockets}
        self._free_lock = threading.Lock()
        threads = [
            threading.Thread(target=self._serve, args=(listener, acceptor), daemon=True)
            for listener, acceptor in zip(self.sockets, acceptors, strict=True)
            for _ in range(max(1, self.cfg.threads))
        ]
        for t in threads:
            t.start()
        while self.alive:
            self.notify()
            if self.ppid != os.getppid():
                self.log.info("Parent changed, shutting down: %s", self)
                break
            time.sleep(min(1.0, self.timeout / 2 if self.timeout else 1.0))
        self.alive = False
        # requests in progress finish (their connections close after the answer); idle
        # keep-alive connections are closed with the process
        deadline = time.monotonic() + self.cfg.graceful_timeout
        for t in threads:
            t.join(max(0.0, deadline - time.monotonic()))

    def _serve(self, listener: socket.socket, acceptor: threading.Lock) -> None:
        """One thread: accept a connection (holding `acceptor`, the listener's), serve its
        requests, repeat while alive."""
        while self.alive:
            # one free thread per process waits for a connection at a time (as gthread's
            # single poller does): with every free thread in accept(), the process that runs
            # first would take a burst of connections and the other workers few
            if not acceptor.acquire(timeout=_ACCEPT_POLL_S):
                continue
            try:
                client, addr = listener.accept()
            except TimeoutError:
                continue
            except OSError as e:
                if e.errno in (errno.EAGAIN, errno.ECONNABORTED, errno.EWOULDBLOCK, errno.EINTR):
                    continue
                if self.alive:  # like the other workers: exit, the master starts a new one
                    self.log.exception("accept() failed; stopping the worker")
                    self.alive = False
                return
            finally:
                acceptor.release()
            # the kernel times out reads and writes (SO_RCVTIMEO/SO_SNDTIMEO: EAGAIN) on a
            # blocking socket; a Python-level timeout would add a poll() to every recv/send
            client.setblocking(True)
            idle = struct.pack("ll", int(self.cfg.keepalive or 0) or 3600, 0)
            client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, idle)
            client.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, idle)
            util.close_on_exec(client)
            with self._free_lock:
                self._free[listener.fileno()] -= 1
            try:
                self._handle(listener, client, addr)
            finally:
                with self._free_lock:
                    self._free[listener.fileno()] += 1

    def _crowded(self, listener: socket.socket) -> bool:
        """No thread of this worker is free for `listener` and a connection waits on it."""
        if self._free[listener.fileno()] > 0:
            return False
        poller = select.poll()
        poller.register(listener, select.POLLIN)
        return bool(poller.poll(0))

    def _handle(self, listener: socket.socket, client: socket.socket, addr) -> None:
        req = None
        try:
            if self.cfg.is_ssl:
                client = sock.ssl_wrap_socket(client, self.cfg)
            conn = Connection(self, client, addr, listener.getsockname())
            while self.alive:
                req = conn.next_request()
                if not self._handle_request(conn, req, listener):
                    break
                # an unread body must not be taken for the next request: drain it, bounded
                if not req.complete and not conn.finish(req, time.monotonic() + DRAIN_S):
                    break
                conn.ready.popleft()
                req = None
        except (ClientGone, TimeoutError, BlockingIOError):
            pass  # the client closed the connection, or it idled past --keep-alive
        except BadRequest as e:
            self.handle_error(req, client, addr, InvalidRequestLine(str(e)))
        except ssl.SSLError as e:
            if e.args[0] != ssl.SSL_ERROR_EOF:
                self.handle_error(req, client, addr, e)
        except OSError as e:
            if e.errno not in (errno.EPIPE, errno.ECONNRESET, errno.ENOTCONN):
                self.log.exception("Socket error processing request.")
        except Exception as e:
            self.handle_error(req, client, addr, e)
        finally:
            util.close_graceful(client)

    def _handle_request(self, conn: Connection, req: Request, listener: socket.socket) -> bool:
        """Run the app for `req`; whether the connection stays open for another request (not
        when the worker stops, nor when every thread is taken and a connection waits: then
        this one closes after its answer, so kept-alive clients cannot starve new ones)."""
        environ: dict = {}
        resp = Response(req, conn.sock)
        try:
            self.cfg.pre_request(self, req)
            request_start = datetime.now() if self._access_log else None
            req.body = Body(conn, req)
            if req._expected_100_continue:
                conn.sock.sendall(CONTINUE)
            environ = self._environ.build(conn, req, resp)
            self.nr += 1
            if self.nr >= self.max_requests and self.alive:
                self.log.info("Autorestarting worker after current request.")
                self.alive = False
            if not self.alive or not self.cfg.keepalive or conn.upgraded or self._crowded(listener):
                resp.force_close()
            respiter = self.wsgi(environ, resp.start_response)
            if conn.broken:  # the body could not be read (the app may have answered a 500)
                resp.force_close()
            try:
                if type(respiter) is list and len(respiter) == 1:
                    resp.finish(respiter[0])  # head and body in one send
                else:
                    for item in respiter:
                        resp.write(item)
                    resp.finish()
            finally:
                if request_start is not None:
                    self.log.access(resp, req, environ, datetime.now() - request_start)
                if hasattr(respiter, "close"):
                    respiter.close()
            return not resp.should_close() and not conn.broken
        except (OSError, ClientGone, BadRequest):
            raise
        except Exception:
            if resp.headers_sent:
                self.log.exception("Error handling request")
                raise ClientGone() from None  # the answer is cut: close the connection
            raise
        finally:
            try:
                self.cfg.post_request(self, req, environ, resp)
            except Exception:
                self.log.exception("Exception in post_request hook")
