-- wrk script for loadtests/bench.py: POST the JSON bodies of a file (one per line) in turn,
-- then print one JSON line of results. Run with one wrk thread, so requests in flight
-- together carry different bodies: concurrent fetches ask for different secret ids, as
-- real clients do, and no batch of fetches collapses into one read.
--
--   wrk -t1 -c20 -d5s -s loadtests/bench.lua URL -- BODIES_FILE [IDS_FILE] [HEADERS_FILE]
--
-- With IDS_FILE, the secret_id of every 200 answer is appended to it, one per line: how
-- the bench learns the ids its creates made (a store keeps only their digests). With
-- HEADERS_FILE, its n-th line ("Name: value") is one more header of the n-th body's
-- request: a request of its own per line (a fresh Idempotency-Key per create, say); give
-- IDS_FILE as "-" to learn no ids.

function init(args)
  local headers = { ["Content-Type"] = "application/json" }
  local extra = args[3] and {} or nil
  if extra then
    for line in io.lines(args[3]) do
      if line ~= "" then table.insert(extra, line) end
    end
  end
  requests = {}
  for line in io.lines(args[1]) do
    if line ~= "" then
      local these = headers
      if extra then
        local header = assert(extra[#requests + 1], "fewer header lines than bodies in " .. args[3])
        local name, value = header:match("^([^:]+):%s*(.-)%s*$")
        assert(name, "not a header line (Name: value) in " .. args[3] .. ": " .. header)
        these = { ["Content-Type"] = "application/json", [name] = value }
      end
      table.insert(requests, wrk.format("POST", nil, these, line))
    end
  end
  assert(#requests > 0, "no request bodies in " .. args[1])
  index = 0
  if args[2] and args[2] ~= "-" then
    -- Defined only here: wrk reads and parses answers only when a script has a response().
    local ids = assert(io.open(args[2], "a"))
    ids:setvbuf("line") -- whole lines, written as they come: this state is never closed
    function response(status, _, body)
      if status == 200 then
        local id = body:match('"secret_id":%s*"([%x-]+)"')
        if id then ids:write(id, "\n") end
      end
    end
  end
end

function request()
  index = index % #requests + 1
  return requests[index]
end

function done(summary, latency, _)
  local e = summary.errors
  io.write(string.format(
    '{"requests": %d, "duration_us": %d, "p50_us": %d, "p95_us": %d, "p99_us": %d, ' ..
    '"status_errors": %d, "socket_errors": %d}\n',
    summary.requests, summary.duration,
    latency:percentile(50), latency:percentile(95), latency:percentile(99),
    e.status, e.connect + e.read + e.write + e.timeout))
end
