-- wrk script of `make bench`: POSTs the bodies in BODIES_DIR in turn, each made unique by a
-- "bench_seq" field (the ingress recognises a retransmission by its body), with the secret in
-- the Authorization header; prints one JSON line of results when done.
-- Usage: wrk -s bench/wrk.lua URL -- BODIES_DIR SECRET RUN_ID
local prefixes, suffixes = {}, {}
local count, seq = 0, 0
local run = ""
local headers = { ["Content-Type"] = "application/json" }

function init(args)
  local dir = args[1]
  headers["Authorization"] = args[2]
  run = args[3]
  local f = assert(io.open(dir .. "/count", "rb"))
  count = tonumber(f:read("*a"))
  f:close()
  for i = 1, count do
    local p = assert(io.open(dir .. "/" .. i .. ".prefix", "rb"))
    prefixes[i] = p:read("*a")
    p:close()
    local s = assert(io.open(dir .. "/" .. i .. ".suffix", "rb"))
    suffixes[i] = s:read("*a")
    s:close()
  end
end

function request()
  seq = seq + 1
  local i = (seq % count) + 1
  local body = prefixes[i] .. '"bench_seq":"' .. run .. "-" .. seq .. '",' .. suffixes[i]
  return wrk.format("POST", wrk.path, headers, body)
end

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    '{"requests":%d,"duration_us":%d,"bytes":%d,"status_errors":%d,"connect_errors":%d,'
      .. '"read_errors":%d,"write_errors":%d,"timeouts":%d,'
      .. '"p50_us":%d,"p99_us":%d,"p999_us":%d,"max_us":%d}\n',
    summary.requests, summary.duration, summary.bytes, e.status, e.connect, e.read, e.write,
    e.timeout, latency:percentile(50), latency:percentile(99), latency:percentile(99.9),
    latency.max))
end
