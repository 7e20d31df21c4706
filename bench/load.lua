-- wrk script of `make bench`: GET requests spread over 1,000 client addresses (X-Forwarded-For,
-- trusted by the benchmark's Envoy: xff_num_trusted_hops 1) and 20 Rocket.Chat routes under
-- /api/v1/ that no preset entry names (so they fall to `default`). Every one of the 20,000
-- (address, route) pairs is built once in init() and replayed in a fixed order, so the Lua
-- cost per request is a table lookup and the load generator stays far from its own limit.
--
-- args: [USER_ID TOKEN]  with both, every request carries X-User-Id / X-Auth-Token.
-- BENCH_HOT=1 in the environment: one address and one route only (the worst case for CAS
-- contention: every request updates the same counter).
-- At the end, one line `BENCH_JSON {...}` with the summary and the latency percentiles (µs).

local routes = {
  "users.info", "users.list", "users.presence", "users.getPreferences", "channels.list",
  "channels.info", "channels.history", "channels.members", "groups.list", "im.list",
  "rooms.get", "rooms.info", "subscriptions.get", "chat.getMessage", "chat.search",
  "emoji-custom.list", "settings.public", "commands.list", "spotlight", "autotranslate.getSupportedLanguages",
}

local reqs = {}
local n = 0
local i = 0

function init(args)
  local user, token = args[1], args[2]
  local last = os.getenv("BENCH_HOT") == "1" and 0 or 19999
  for k = 0, last do
    local a = k % 1000
    local r = (math.floor(k / 1000) + a) % 20 -- a bijection onto all 1000 x 20 pairs
    local headers = {
      ["Host"] = "bench",
      ["X-Forwarded-For"] = string.format("10.1.%d.%d", math.floor(a / 250), a % 250 + 1),
    }
    if user and token then
      headers["X-User-Id"] = user
      headers["X-Auth-Token"] = token
    end
    n = n + 1
    reqs[n] = wrk.format("GET", "/api/v1/" .. routes[r + 1], headers)
  end
end

function request()
  i = i % n + 1
  return reqs[i]
end

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'BENCH_JSON {"requests":%d,"duration_us":%d,"bytes":%d,"errors":{"connect":%d,"read":%d,"write":%d,"status":%d,"timeout":%d},"latency_us":{"mean":%.1f,"p50":%d,"p90":%d,"p99":%d,"max":%d}}\n',
    summary.requests, summary.duration, summary.bytes, e.connect, e.read, e.write, e.status,
    e.timeout, latency.mean, latency:percentile(50), latency:percentile(90),
    latency:percentile(99), latency.max))
end
