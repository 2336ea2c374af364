-- wrk script: POST pre-signed GHL webhooks, each body once, then stop.
-- Usage: wrk -t1 -cN -dT -s webhook.lua URL -- BODIES_FILE PATH DONE_FILE
-- BODIES_FILE: one "signature body" per line (the signature is base64, without spaces).
-- Once every body has been answered the script creates DONE_FILE: wrk itself runs for the whole
-- -d, so bench/run.py then stops it with SIGINT, which ends the run and prints the summary.
-- wrk calls request() once per thread before connecting and never sends that request: the
-- index starts at 0 so that the first body is the first one sent.
local signatures, bodies, count, next_index, answered = {}, {}, 0, -1, 0
local path, done_file = "/", nil

function init(args)
  path, done_file = args[2], args[3]
  for line in io.lines(args[1]) do
    local signature, body = line:match("^(%S+) (.+)$")
    count = count + 1
    signatures[count], bodies[count] = signature, body
  end
end

function request()
  next_index = next_index + 1
  local i = math.max(next_index, 1)
  if i > count then -- every body is out: idle until bench/run.py stops wrk
    i = count
  end
  return wrk.format("POST", path, {
    ["Content-Type"] = "application/json",
    ["X-GHL-Signature"] = signatures[i],
  }, bodies[i])
end

function response(status, headers, body)
  answered = answered + 1
  if answered == count then
    io.open(done_file, "w"):close()
    wrk.thread:stop()
  end
end

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    '{"requests": %d, "duration_us": %d, "p50_us": %d, "p99_us": %d, "max_us": %d, '
      .. '"non_2xx": %d, "connect_errors": %d, "read_errors": %d, "timeouts": %d}\n',
    summary.requests, summary.duration, latency:percentile(50), latency:percentile(99),
    latency.max, e.status, e.connect, e.read, e.timeout))
end
