-- wrk script for the usage-report benchmark (scripts/bench/usage_bench.py).
-- The file holds one instance token per line. Thread k of n sends with tokens
-- k, k+n, k+2n... in turn, so the instances are reported for round-robin.
-- With "keys", each report carries an Idempotency-Key of its own, as an instance
-- that may send a report again does.
--   wrk ... -s usage.lua URL -- FILE NTHREADS [keys]
local counter = 0
local threads = {}

function setup(thread)
  thread:set("id", counter)
  counter = counter + 1
  table.insert(threads, thread)
end

function init(args)
  local file, n = args[1], tonumber(args[2])
  keys = args[3] == "keys"
  reqs, tokens = {}, {}
  local i = 0
  for token in io.lines(file) do
    if i % n == id then
      tokens[#tokens + 1] = token
      reqs[#reqs + 1] = wrk.format("POST", nil,
        {["Content-Type"] = "application/json", ["Authorization"] = "Bearer " .. token},
        '{"agent":"general"}')
    end
    i = i + 1
  end
  pos = 0
  sent = 0
  non2xx = 0
end

function request()
  pos = pos % #reqs + 1
  if not keys then return reqs[pos] end
  sent = sent + 1
  return wrk.format("POST", nil,
    {["Content-Type"] = "application/json", ["Authorization"] = "Bearer " .. tokens[pos],
     ["Idempotency-Key"] = string.format("bench-%d-%d", id, sent)},
    '{"agent":"general"}')
end

function response(status, headers, body)
  if status ~= 200 then non2xx = non2xx + 1 end
end

function done(summary, latency, requests)
  local bad = 0
  for _, t in ipairs(threads) do bad = bad + (t:get("non2xx") or 0) end
  io.write(string.format(
    "RESULT {\"requests\":%d,\"rps\":%.1f,\"p50_ms\":%.3f,\"p99_ms\":%.3f,\"non200\":%d,\"socket_errors\":%d}\n",
    summary.requests, summary.requests / (summary.duration / 1e6),
    latency:percentile(50) / 1000, latency:percentile(99) / 1000, bad,
    summary.errors.connect + summary.errors.read + summary.errors.write + summary.errors.timeout))
end
