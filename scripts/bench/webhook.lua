-- wrk script for the webhook benchmark (scripts/bench/webhook_bench.py).
-- wrk's LuaJIT has no HMAC, so requests are signed beforehand: the file holds
-- one "<Stripe-Signature>\t<compact JSON body>" per line. Thread k of n sends
-- lines k, k+n, k+2n... in a cycle (unique events stay unique across threads).
--   wrk ... -s webhook.lua URL -- FILE NTHREADS [DELAY_MS]
-- DELAY_MS paces each connection (think time before each request): wrk2 is not
-- packaged, so a fixed per-connection delay is how a lower rate is offered.
local counter = 0
local threads = {}

function setup(thread)
  thread:set("id", counter)
  counter = counter + 1
  table.insert(threads, thread)
end

function init(args)
  local file, n = args[1], tonumber(args[2])
  pause = tonumber(args[3] or "0")
  reqs = {}
  local i = 0
  for line in io.lines(file) do
    if i % n == id then
      local tab = line:find("\t", 1, true)
      local sig, body = line:sub(1, tab - 1), line:sub(tab + 1)
      reqs[#reqs + 1] = wrk.format("POST", nil,
        {["Content-Type"] = "application/json", ["Stripe-Signature"] = sig}, body)
    end
    i = i + 1
  end
  if #reqs == 0 then
    -- fewer lines than threads (the duplicate run): every thread sends line 0
    for line in io.lines(file) do
      local tab = line:find("\t", 1, true)
      reqs[1] = wrk.format("POST", nil,
        {["Content-Type"] = "application/json", ["Stripe-Signature"] = line:sub(1, tab - 1)},
        line:sub(tab + 1))
      break
    end
  end
  pos = 0
  non2xx = 0
end

function request()
  pos = pos % #reqs + 1
  return reqs[pos]
end

-- wrk waits whole milliseconds; a fractional DELAY_MS is kept exact on average by
-- carrying the remainder from one request to the next.
carry = 0
function delay()
  carry = carry + pause
  local ms = math.floor(carry)
  carry = carry - ms
  return ms
end

function response(status, headers, body)
  if status ~= 200 then non2xx = non2xx + 1 end
end

function done(summary, latency, requests)
  local bad = 0
  for _, t in ipairs(threads) do bad = bad + (t:get("non2xx") or 0) end
  io.write(string.format(
    "RESULT {\"requests\":%d,\"duration_us\":%d,\"rps\":%.1f,\"p50_ms\":%.3f,\"p90_ms\":%.3f,\"p99_ms\":%.3f,\"max_ms\":%.3f,\"non200\":%d,\"socket_errors\":%d}\n",
    summary.requests, summary.duration, summary.requests / (summary.duration / 1e6),
    latency:percentile(50) / 1000, latency:percentile(90) / 1000, latency:percentile(99) / 1000,
    latency.max / 1000, bad,
    summary.errors.connect + summary.errors.read + summary.errors.write + summary.errors.timeout))
end
