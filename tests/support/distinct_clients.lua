-- wrk script: every request comes from a new client address (X-Forwarded-For, trusted by the
-- test's Envoy config), numbered from START. Run with ONE thread (-t1): after COUNT responses
-- the process exits (wrk itself would only stop at its -d duration). The test reads Envoy's
-- own metrics, so wrk's summary is not needed.
-- args: START COUNT PATH [v6]  (v6: addresses 2001:db8:1:2:x:x:x:x, all in one IPv6 /64)
local threads = {}
local next_id = 0

function setup(thread)
  thread:set("id", next_id)
  next_id = next_id + 1
  table.insert(threads, thread)
end

function init(args)
  start = tonumber(args[1])
  per_thread = tonumber(args[2])
  path = args[3]
  v6 = args[4] == "v6"
  first = start + id * per_thread
  sent = 0
  received = 0
end

local function address(n)
  if v6 then
    return string.format("2001:db8:1:2:%x:%x:%x:%x", math.floor(n / 281474976710656) % 65536,
      math.floor(n / 4294967296) % 65536, math.floor(n / 65536) % 65536, n % 65536)
  end
  local a = math.floor(n / 65536) % 256
  local b = math.floor(n / 256) % 256
  local c = n % 256
  return string.format("10.%d.%d.%d", a, b, c)
end

function request()
  local n = first + sent
  sent = sent + 1
  if sent > per_thread then
    -- Past this thread's share: repeat the last address (not counted as a new client).
    n = first + per_thread - 1
  end
  return wrk.format("GET", path, { ["X-Forwarded-For"] = address(n) })
end

function response(status, headers, body)
  received = received + 1
  if received >= per_thread then
    io.write(string.format("done: %d responses\n", received))
    io.flush()
    os.exit(0)
  end
end
