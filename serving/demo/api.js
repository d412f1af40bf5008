// The typed client of the recsys API: openapi-fetch over the types openapi-typescript generated
// from /openapi.json (web/client/schema.d.ts). Copy this file to call the API from a storefront.
import createClient from "openapi-fetch";
/** A client sending `Authorization: Bearer <token>` with whatever token `token()` holds. */
export function apiClient(baseUrl, token) {
    const client = createClient({ baseUrl });
    const auth = {
        onRequest({ request }) {
            const t = token();
            if (t)
                request.headers.set("Authorization", `Bearer ${t}`);
            return request;
        },
    };
    client.use(auth);
    return client;
}
/** An error answer of the API (RFC 9457 Problem Details), or a network failure (status 0). */
export class ApiError extends Error {
    status;
    problem;
    retryAfter;
    constructor(status, message, problem, retryAfter) {
        super(message);
        this.status = status;
        this.problem = problem;
        this.retryAfter = retryAfter;
    }
}
/** A readable sentence for a Problem Details body (what the page shows for 409, 422, 429 ...). */
export function describeProblem(status, body, retryAfter) {
    const p = (body && typeof body === "object" ? body : {});
    const title = p.title ?? `HTTP ${status}`;
    let text = `${status} ${title}: ${p.detail ?? "no detail"}`;
    if (status === 409 && p.current_version) {
        text += ` (someone else saved version ${p.current_version} first; reload and retry)`;
    }
    if (status === 429)
        text += ` (retry in ${retryAfter ?? "a few"} s)`;
    if (p.code)
        text += ` [${p.code}]`;
    return text;
}
/** The data of an openapi-fetch result, or an ApiError carrying its Problem Details. */
export async function unwrap(call) {
    let result;
    try {
        result = await call;
    }
    catch (e) {
        throw new ApiError(0, `Network error: ${e.message}; the page keeps working.`);
    }
    const { data, error, response } = result;
    if (error !== undefined || !response.ok) {
        const retry = response.headers.get("Retry-After");
        throw new ApiError(response.status, describeProblem(response.status, error, retry), error, retry);
    }
    return { data: data, response };
}
