// The demo storefront and merchandiser playground. Every call goes through the typed client
// (api.ts); the page is built to be copied: one request per surface, the answer rendered as is.
import {
  ApiError,
  apiClient,
  unwrap,
  type DemoItem,
  type Item,
  type RecommendRequest,
  type RecommendResponse,
  type Rule,
  type TraceEntry,
} from "./api.js";

const K = 8;
const state = {
  tenant: "",
  shopperToken: null as string | null,
  adminToken: null as string | null,
  user: "", // "" = anonymous session
  anonymousId: `anon-${Math.random().toString(36).slice(2, 10)}`,
  sessionId: `s-${Date.now().toString(36)}`,
  anchors: [] as string[],
  caps: {} as Record<string, number>,
  why: false,
  rules: [] as Rule[],
  rulesEtag: null as string | null,
  rulesVersion: null as string | null,
  catalogue: new Map<string, DemoItem>(),
  lastRender: null as null | { serverMs: number; renderMs: number },
};
const shop = apiClient(location.origin, () => state.shopperToken);
const admin = apiClient(location.origin, () => state.adminToken);

const $ = <T extends HTMLElement>(id: string) => document.getElementById(id) as T;
function el(tag: string, attrs: Record<string, string> = {}, ...kids: (Node | string)[]) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
  node.append(...kids);
  return node;
}

/** Show a message in a status line ("error" for problems; the page stays usable). */
function say(where: string, text: string, kind: "info" | "error" | "warn" = "info") {
  const box = $(where);
  box.textContent = text;
  box.className = `status ${kind}`;
}
function sayError(where: string, e: unknown) {
  say(where, e instanceof ApiError ? e.message : String(e), "error");
  if (!(e instanceof ApiError)) console.error(e);
}

// --- login ------------------------------------------------------------------------------------
async function login(tenant: string) {
  const [shopper, merch] = await Promise.all([
    unwrap(shop.POST("/demo/login", { body: { tenant, admin: false } })),
    unwrap(shop.POST("/demo/login", { body: { tenant, admin: true } })),
  ]);
  state.tenant = tenant;
  state.shopperToken = shopper.data.token;
  state.adminToken = merch.data.token;
  $("who").textContent = `tenant ${tenant}: tokens for ${merch.data.expires_in / 60} min`;
}

async function loadUsers() {
  const { data } = await unwrap(shop.GET("/demo/users", { params: { query: { limit: 12 } } }));
  const select = $<HTMLSelectElement>("user");
  select.replaceChildren(el("option", { value: "" }, "anonymous session"));
  for (const u of data.users) select.append(el("option", { value: u }, u));
  select.append(el("option", { value: "u-not-a-customer" }, "u-not-a-customer (unknown)"));
  if (data.users.length) select.value = data.users[0];
  state.user = select.value;
}

async function describeItems(ids: string[]) {
  const missing = ids.filter((id) => !state.catalogue.has(id));
  if (!missing.length) return;
  const { data } = await unwrap(
    shop.GET("/demo/items", { params: { query: { ids: missing.join(",") } } }),
  );
  for (const item of data.items) state.catalogue.set(item.item_id, item);
}

// --- the home surface ---------------------------------------------------------------------------
function recommendRequest(): RecommendRequest {
  const anonymous = state.user === "";
  const request: RecommendRequest = {
    user: anonymous
      ? { anonymous_id: state.anonymousId, session_id: state.sessionId }
      : { user_id: state.user },
    k: K,
    options: { include_reasons: true, explain: "full", include_trace: state.why },
  };
  if (anonymous && state.anchors.length) request.anchors = { item_ids: state.anchors };
  if (Object.keys(state.caps).length) request.constraints = { max_per_tag: state.caps };
  return request;
}

async function refresh(expectRules?: string | null) {
  const started = performance.now();
  say("home-status", "loading…");
  try {
    let answer: RecommendResponse | null = null;
    // A rule change reaches every worker within its check interval: ask again until the
    // answer carries the version just written.
    for (let attempt = 0; attempt < 12; attempt++) {
      answer = (await unwrap(shop.POST("/v1/recommend", { body: recommendRequest() }))).data;
      if (!expectRules || answer.meta.rules_version === expectRules) break;
      await new Promise((r) => setTimeout(r, 250));
    }
    if (!answer) return;
    const serverDone = performance.now();
    const ids = answer.items.map((i) => i.item_id);
    if (answer.trace) ids.push(...answer.trace.map((t) => t.item_id));
    await describeItems([...new Set(ids)]);
    renderHome(answer);
    renderTrace(answer.trace ?? null);
    const done = performance.now();
    state.lastRender = { serverMs: serverDone - started, renderMs: done - serverDone };
    performance.mark("recsys:home-rendered");
    // (a defaulted surface or k is what this page expects; other warnings are worth showing)
    const warnings = answer.warnings
      .filter((w) => w.code !== "DEFAULT_APPLIED")
      .map((w) => `${w.code}: ${w.detail}`);
    say(
      "home-status",
      warnings.length
        ? `Served with warnings: ${warnings.join("; ")}`
        : `${answer.items.length} items from snapshot ${answer.meta.snapshot_id} (${answer.meta.algo_version})`,
      warnings.length ? "warn" : "info",
    );
  } catch (e) {
    sayError("home-status", e);
  }
}

function card(item: Item, surface: string) {
  const info = state.catalogue.get(item.item_id);
  const title = info?.title ?? item.item_id;
  const price = info?.price != null ? `€${info.price.toFixed(2)}` : "";
  const node = el(
    "article",
    { class: "card", "data-item-id": item.item_id, "data-rank": String(item.rank) },
    el("div", { class: "rank" }, `#${item.rank}`),
    el("h3", { class: "title" }, title),
    el("div", { class: "price" }, price),
    el("div", { class: "tags" }, ...(info?.tags ?? []).map((t) => el("span", { class: "tag" }, t))),
  );
  if (item.reasons?.length) {
    node.append(el("ul", { class: "reasons" }, ...item.reasons.map((r) => el("li", {}, r))));
  }
  if (state.why && item.explain) {
    const signals = Object.entries(item.explain.signals)
      .map(([k, v]) => `${k} ${v.toFixed(3)}`)
      .join(" · ");
    const rules = item.explain.rules.length ? ` | rules: ${item.explain.rules.join(", ")}` : "";
    node.append(el("div", { class: "signals" }, `score ${item.score.toFixed(3)}: ${signals}${rules}`));
  }
  const actions = el("div", { class: "actions" });
  const button = (label: string, cls: string, fn: () => void) => {
    const b = el("button", { class: cls, type: "button" }, label);
    b.addEventListener("click", (ev) => {
      ev.stopPropagation();
      fn();
    });
    actions.append(b);
  };
  button("view", "view", () => void openItem(item.item_id, surface));
  button("add to cart", "cart", () => void sendEvent(item.item_id, "add_to_cart"));
  button("buy", "buy", () => void sendEvent(item.item_id, "purchase"));
  node.append(actions);
  return node;
}

function renderHome(answer: RecommendResponse) {
  $("home").replaceChildren(...answer.items.map((i) => card(i, "home")));
}

function renderTrace(trace: TraceEntry[] | null) {
  const box = $("trace");
  box.hidden = !state.why;
  if (!state.why || !trace) return;
  const head = el(
    "tr",
    {},
    ...["item", "title", "source", "outcome", "rule", "detail", "position"].map((h) =>
      el("th", {}, h),
    ),
  );
  const rows = trace.map((t) =>
    el(
      "tr",
      { class: `outcome-${t.outcome}`, "data-item-id": t.item_id, "data-outcome": t.outcome },
      el("td", {}, t.item_id),
      el("td", {}, state.catalogue.get(t.item_id)?.title ?? ""),
      el("td", {}, t.source),
      el("td", {}, t.outcome),
      el("td", { class: "rule" }, t.rule ?? ""),
      el("td", {}, t.detail ?? ""),
      el("td", {}, t.position != null ? String(t.position) : ""),
    ),
  );
  const counts = new Map<string, number>();
  for (const t of trace) counts.set(t.outcome, (counts.get(t.outcome) ?? 0) + 1);
  const summary = [...counts].map(([o, n]) => `${n} ${o}`).join(", ");
  box.replaceChildren(
    el("h2", {}, "Why: the decision trace"),
    el("p", {}, `${trace.length} candidates considered: ${summary}`),
    el("table", { id: "trace-table" }, head, ...rows),
  );
}

// --- an item and its similar items --------------------------------------------------------------
async function openItem(itemId: string, surface: string) {
  await sendEvent(itemId, "click", surface);
  if (state.user === "" && !state.anchors.includes(itemId)) {
    state.anchors = [...state.anchors, itemId].slice(-5);
    renderAnchors();
    void refresh();
  }
  const panel = $("item");
  panel.hidden = false;
  const info = state.catalogue.get(itemId);
  $("item-title").textContent = info?.title ?? itemId;
  $("item-meta").textContent = info
    ? `${itemId} · ${info.category ?? ""} · ${info.brand ?? ""} · €${info.price?.toFixed(2) ?? "?"}`
    : itemId;
  const kinds = [
    ["cooc", "bought or viewed together"],
    ["emb", "similar (embedding)"],
    ["blend", "blend"],
  ] as const;
  const columns = await Promise.all(
    kinds.map(async ([kind, label]) => {
      try {
        const { data } = await unwrap(
          shop.POST("/v1/similar", {
            body: { item_id: itemId, kind, k: 4, options: { include_reasons: true } },
          }),
        );
        await describeItems(data.items.map((i) => i.item_id));
        const list = data.items.length
          ? data.items.map((i) => card(i, `similar-${kind}`))
          : [el("p", {}, "none")];
        return el("section", { class: "similar", "data-kind": kind }, el("h3", {}, label), ...list);
      } catch (e) {
        const msg = e instanceof ApiError ? e.message : String(e);
        return el("section", { class: "similar" }, el("h3", {}, label), el("p", { class: "error" }, msg));
      }
    }),
  );
  $("similar").replaceChildren(...columns);
}

// --- events -------------------------------------------------------------------------------------
async function sendEvent(itemId: string, eventType: string, surface = "home") {
  const userId = state.user || state.anonymousId;
  try {
    const { data, response } = await unwrap(
      shop.POST("/v1/recs/events", {
        body: {
          user_id: userId,
          item_id: itemId,
          event_type: eventType,
          timestamp: new Date().toISOString(),
          session_id: state.sessionId,
          context: { surface, source: "demo" },
        },
      }),
    );
    const id = String((data as { event_id?: string }).event_id ?? "");
    const line = el(
      "li",
      { class: "event", "data-event-id": id, "data-event-type": eventType },
      `${response.status} ${eventType} ${itemId} → event ${id}`,
    );
    $("events").prepend(line);
    if (eventType !== "click" && state.user === "" && !state.anchors.includes(itemId)) {
      state.anchors = [...state.anchors, itemId].slice(-5);
      renderAnchors();
      void refresh();
    }
  } catch (e) {
    sayError("events-status", e);
  }
}

function renderAnchors() {
  const box = $("anchors");
  box.hidden = state.user !== "";
  box.replaceChildren(
    el("span", {}, "session anchors: "),
    ...state.anchors.map((a) => el("span", { class: "tag anchor" }, state.catalogue.get(a)?.title ?? a)),
  );
  if (state.anchors.length) {
    const clear = el("button", { type: "button" }, "clear");
    clear.addEventListener("click", () => {
      state.anchors = [];
      renderAnchors();
      void refresh();
    });
    box.append(clear);
  }
}

// --- the merchandiser playground ------------------------------------------------------------
async function loadRules() {
  const { data, response } = await unwrap(
    admin.GET("/v1/admin/tenants/{tenant_id}/rules", {
      params: { path: { tenant_id: state.tenant } },
    }),
  );
  state.rules = data.rules ?? [];
  state.rulesEtag = response.headers.get("ETag");
  state.rulesVersion = data.rules_version ?? null;
  renderRules();
}

async function saveRules(rules: Rule[], what: string) {
  say("rules-status", `saving: ${what}…`);
  try {
    const { data, response } = await unwrap(
      admin.PUT("/v1/admin/tenants/{tenant_id}/rules", {
        params: { path: { tenant_id: state.tenant } },
        body: { rules },
        headers: state.rulesEtag ? { "If-Match": state.rulesEtag } : { "If-None-Match": "*" },
      }),
    );
    state.rules = data.rules ?? [];
    state.rulesEtag = response.headers.get("ETag");
    state.rulesVersion = data.rules_version ?? null;
    renderRules();
    say("rules-status", `saved: ${what} (version ${state.rulesVersion})`);
    await refresh(state.rulesVersion);
  } catch (e) {
    sayError("rules-status", e);
  }
}

function renderRules() {
  const rows = state.rules.map((r) => {
    const what =
      r.type === "pin"
        ? `pin ${r.item_id} at slot ${r.position}`
        : r.type === "block"
          ? `block ${[...(r.item_ids ?? []), ...(r.tags ?? [])].join(", ")}`
          : `${r.type} tag ${r.tag} ×${r.factor}`;
    const remove = el("button", { type: "button", class: "remove" }, "remove");
    remove.addEventListener("click", () =>
      void saveRules(
        state.rules.filter((x) => x.id !== r.id),
        `remove ${r.id}`,
      ),
    );
    return el("li", { "data-rule-id": r.id, "data-rule-type": r.type }, `${r.id}: ${what} `, remove);
  });
  const caps = Object.entries(state.caps).map(([tag, n]) =>
    el("li", { "data-cap": tag }, `at most ${n} per ${tag} (this page's request)`),
  );
  $("rules").replaceChildren(...rows, ...caps);
  $("rules-version").textContent = state.rulesEtag ? `ETag ${state.rulesEtag}` : "";
}

function field(id: string) {
  return $<HTMLInputElement>(id).value.trim();
}

function ruleId(kind: string) {
  return `demo-${kind}-${Date.now().toString(36)}`;
}

function bindPlayground() {
  $("pin-form").addEventListener("submit", (ev) => {
    ev.preventDefault();
    const item = field("pin-item");
    const position = Number(field("pin-slot"));
    const rule: Rule = { id: ruleId("pin"), type: "pin", item_id: item, position };
    void saveRules([...state.rules, rule], `pin ${item} at ${position}`);
  });
  $("tag-form").addEventListener("submit", (ev) => {
    ev.preventDefault();
    const tag = field("tag-name");
    const kind = $<HTMLSelectElement>("tag-kind").value as "boost" | "bury";
    const factor = Number(field("tag-factor"));
    const rule: Rule = { id: ruleId(kind), type: kind, tag, factor };
    void saveRules([...state.rules, rule], `${kind} ${tag}`);
  });
  $("block-form").addEventListener("submit", (ev) => {
    ev.preventDefault();
    const item = field("block-item");
    const rule: Rule = { id: ruleId("block"), type: "block", item_ids: [item] };
    void saveRules([...state.rules, rule], `block ${item}`);
  });
  $("cap-form").addEventListener("submit", (ev) => {
    ev.preventDefault();
    const tag = field("cap-tag");
    const cap = Number(field("cap-n"));
    if (cap > 0) state.caps = { ...state.caps, [tag]: cap };
    else delete state.caps[tag];
    renderRules();
    void refresh();
  });
  $("rules-reload").addEventListener("click", () => {
    loadRules().then(
      () => say("rules-status", "reloaded"),
      (e) => sayError("rules-status", e),
    );
  });
}

// --- start ----------------------------------------------------------------------------------
async function start() {
  bindPlayground();
  $<HTMLSelectElement>("user").addEventListener("change", (ev) => {
    state.user = (ev.target as HTMLSelectElement).value;
    renderAnchors();
    void refresh();
  });
  $<HTMLInputElement>("why").addEventListener("change", (ev) => {
    state.why = (ev.target as HTMLInputElement).checked;
    void refresh();
  });
  try {
    const { data } = await unwrap(shop.GET("/demo/info"));
    const tenant = new URLSearchParams(location.search).get("tenant") ?? data.tenants[0];
    await login(tenant);
    await Promise.all([loadUsers(), loadRules()]);
    renderAnchors();
    await refresh();
  } catch (e) {
    sayError("home-status", e);
  }
  document.body.dataset.ready = "1";
}

// For the browser tests and for curious developers: how long the first render took.
(window as unknown as { recsysDemo: unknown }).recsysDemo = {
  state,
  refresh,
  lastRender: () => state.lastRender,
};
void start();
