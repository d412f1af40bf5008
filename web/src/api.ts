// The typed client of the recsys API: openapi-fetch over the types openapi-typescript generated
// from /openapi.json (web/client/schema.d.ts). Copy this file to call the API from a storefront.
import createClient, { type Client, type Middleware } from "openapi-fetch";
import type { components, paths } from "../client/schema";

export type Schemas = components["schemas"];
export type RecommendRequest = Schemas["RecommendRequest"];
export type RecommendResponse = Schemas["RecommendResponse"];
export type Item = Schemas["Item"];
export type TraceEntry = Schemas["TraceEntry"];
export type Rule = Schemas["Rule"];
export type TenantRules = Schemas["TenantRules"];
export type DemoItem = Schemas["DemoItem"];
export type Problem = Schemas["Problem"];
export type ApiClient = Client<paths>;

/** A client sending `Authorization: Bearer <token>` with whatever token `token()` holds. */
export function apiClient(baseUrl: string, token: () => string | null): ApiClient {
  const client = createClient<paths>({ baseUrl });
  const auth: Middleware = {
    onRequest({ request }) {
      const t = token();
      if (t) request.headers.set("Authorization", `Bearer ${t}`);
      return request;
    },
  };
  client.use(auth);
  return client;
}

/** An error answer of the API (RFC 9457 Problem Details), or a network failure (status 0). */
export class ApiError extends Error {
  constructor(
    readonly status: number,
    message: string,
    readonly problem?: Partial<Problem>,
    readonly retryAfter?: string | null,
  ) {
    super(message);
  }
}

/** A readable sentence for a Problem Details body (what the page shows for 409, 422, 429 ...). */
export function describeProblem(status: number, body: unknown, retryAfter?: string | null): string {
  const p = (body && typeof body === "object" ? body : {}) as Partial<Problem>;
  const title = p.title ?? `HTTP ${status}`;
  let text = `${status} ${title}: ${p.detail ?? "no detail"}`;
  if (status === 409 && p.current_version) {
    text += ` (someone else saved version ${p.current_version} first; reload and retry)`;
  }
  if (status === 429) text += ` (retry in ${retryAfter ?? "a few"} s)`;
  if (p.code) text += ` [${p.code}]`;
  return text;
}

/** The data of an openapi-fetch result, or an ApiError carrying its Problem Details. */
export async function unwrap<T>(
  call: Promise<{ data?: T; error?: unknown; response: Response }>,
): Promise<{ data: T; response: Response }> {
  let result: { data?: T; error?: unknown; response: Response };
  try {
    result = await call;
  } catch (e) {
    throw new ApiError(0, `Network error: ${(e as Error).message}; the page keeps working.`);
  }
  const { data, error, response } = result;
  if (error !== undefined || !response.ok) {
    const retry = response.headers.get("Retry-After");
    throw new ApiError(
      response.status,
      describeProblem(response.status, error, retry),
      error as Partial<Problem>,
      retry,
    );
  }
  return { data: data as T, response };
}
