-- wrk script: POST one OpenAI chat body; optionally paced; one parseable result line.
--
-- Environment (wrk passes no per-run options to Lua, so the runner uses env vars):
--   BENCH_BODY_FILE    path of the JSON request body
--   BENCH_API_KEY      bearer key Envoy/ATP authenticate
--   BENCH_THREAD_RATE  requests/s for each wrk thread; unset or 0 = closed loop

local function read_file(path)
  local f = assert(io.open(path, "rb"), "cannot open " .. tostring(path))
  local data = f:read("*a")
  f:close()
  return data
end

wrk.method = "POST"
wrk.body = read_file(os.getenv("BENCH_BODY_FILE"))
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer " .. (os.getenv("BENCH_API_KEY") or "")

local thread_rate = tonumber(os.getenv("BENCH_THREAD_RATE") or "0") or 0

if thread_rate > 0 then
  -- Pacing: each thread hands out send slots on a fixed schedule. delay() runs before
  -- every request of every connection of this thread; it reserves the next free slot
  -- and waits until then. The schedule, not the response time, sets the rate, so the
  -- total rate is threads x thread_rate as long as enough connections are idle.
  local ffi = require("ffi")
  ffi.cdef [[
    typedef struct { long tv_sec; long tv_nsec; } bench_timespec;
    int clock_gettime(int clk_id, bench_timespec *tp);
  ]]
  local CLOCK_MONOTONIC = 1
  local ts = ffi.new("bench_timespec")
  local function now_ms()
    ffi.C.clock_gettime(CLOCK_MONOTONIC, ts)
    return tonumber(ts.tv_sec) * 1000 + tonumber(ts.tv_nsec) / 1e6
  end

  local interval_ms = 1000 / thread_rate
  local next_slot = nil

  function delay()
    local now = now_ms()
    if next_slot == nil or next_slot < now - interval_ms then
      -- First request, or we fell behind: restart the schedule instead of bursting.
      next_slot = now
    end
    local slot = next_slot
    next_slot = next_slot + interval_ms
    local wait = slot - now
    if wait < 0 then wait = 0 end
    return math.floor(wait + 0.5)
  end
end

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    "BENCH_RESULT requests=%d duration_us=%d connect=%d read=%d write=%d status=%d " ..
    "timeout=%d p50_us=%d p95_us=%d p99_us=%d\n",
    summary.requests, summary.duration, e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(95), latency:percentile(99)))
end
