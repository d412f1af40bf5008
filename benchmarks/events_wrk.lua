-- wrk load for POST /v1/recs/events (single) and /v1/recs/events/bulk, each event unique and
-- valid (distinct event ids and timestamps), so the server's work is measured, not the
-- client's (wrk is C + LuaJIT: a few microseconds a request on the shared cores).
--
--   TOKEN=<jwt> wrk -t2 -c64 -d8s -s benchmarks/events_wrk.lua http://127.0.0.1:8000 -- \
--       <prefix> [bulk size, 0 = single events]
--
-- Every thread counts its answers by status and the events acknowledged (201 of a single post,
-- "accepted" of a bulk answer); done() prints them as one `result` line for events_ingest.py.

local threads = {}

function setup(thread)
   thread:set("tid", #threads + 1)
   table.insert(threads, thread)
end

function init(args)
   prefix = (args[1] or "w") .. "-" .. tid .. "-"
   bulk = tonumber(args[2] or "0")
   n, answered, acked, failed = 0, 0, 0, 0
   headers = {
      ["Authorization"] = "Bearer " .. os.getenv("TOKEN"),
      ["Content-Type"] = "application/json",
   }
end

local function event()
   n = n + 1
   return string.format(
      '{"event_id":"%s%d","type":"click","user_id":"u%d","item_id":"i%d",'
         .. '"timestamp":%d,"session_id":"s%d"}',
      prefix, n, n % 5000, n % 997, 1735689600 + n % 86400, n % 300
   )
end

function request()
   if bulk == 0 then
      return wrk.format("POST", "/v1/recs/events", headers, event())
   end
   local lines = {}
   for k = 1, bulk do
      lines[k] = event()
   end
   return wrk.format("POST", "/v1/recs/events/bulk", headers, table.concat(lines, "\n"))
end

function response(status, _, body)
   answered = answered + 1
   if bulk == 0 then
      if status == 201 then
         acked = acked + 1
      else
         failed = failed + 1
      end
   elseif status == 200 then
      acked = acked + tonumber(body:match('"accepted":(%d+)'))
   else
      failed = failed + 1
   end
end

function done(summary, _, _)
   local a, f, r = 0, 0, 0
   for _, t in ipairs(threads) do
      a, f, r = a + t:get("acked"), f + t:get("failed"), r + t:get("answered")
   end
   io.write(string.format("result acked=%d failed=%d answered=%d errors=%d us=%d\n",
      a, f, r, summary.errors.connect + summary.errors.read + summary.errors.write
         + summary.errors.timeout, summary.duration))
end
