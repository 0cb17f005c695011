"""The Lua scripts of fair sharing (worker/fairness/__init__.py says what they keep).

Each runs atomically in Redis: KEYS are the user's running and waiting sets and arq's queue;
ARGV[1..4] the job's arq id, the user's cap, now (ms) and arq's in-progress key prefix.
"""

# Shared by both scripts: prune the slots whose job's lease is gone (never this job's own: a
# re-run after a crash keeps its slot), and find the oldest `n` waiting jobs still in arq's
# queue, dropping the entries of jobs that left it (finished, or lost with Redis's data).
_COMMON = """
local running, waiting, queue = KEYS[1], KEYS[2], KEYS[3]
local job, cap, now_ms, in_progress = ARGV[1], tonumber(ARGV[2]), ARGV[3], ARGV[4]
local function prune_running()
  for _, holder in ipairs(redis.call('ZRANGE', running, 0, -1)) do
    if holder ~= job and redis.call('EXISTS', in_progress .. holder) == 0 then
      redis.call('ZREM', running, holder)
    end
  end
end
local function live_waiting(n)
  local live = {}
  while #live < n do
    -- Entries before #live are live or were removed: the next page starts there.
    local page = redis.call('ZRANGE', waiting, #live, #live + 99)
    if #page == 0 then break end
    for _, member in ipairs(page) do
      if redis.call('ZSCORE', queue, member) then
        live[#live + 1] = member
        if #live == n then break end
      else
        redis.call('ZREM', waiting, member)
      end
    end
  end
  return live
end
local function wake(members)
  for _, member in ipairs(members) do
    -- LT: never later than it is (a job already due keeps its place among other users').
    redis.call('ZADD', queue, 'XX', 'LT', now_ms, member)
  end
end
local function touch(ttl_ms)
  redis.call('PEXPIRE', running, ttl_ms)
  redis.call('PEXPIRE', waiting, ttl_ms)
end
"""

# ARGV[5..]: the job's order (row created_at, microseconds), the park-until score, the job
# key's keep, the sets' TTL, arq's job and retry key prefixes, then the arq ids of the user's
# older open rows (a running continuation `<id>:from:<n>` counts for its row `<id>`).
# Returns 1 admitted, 0 parked.
CLAIM = (
    _COMMON
    + """
local order, park_until, keep_ms, ttl_ms = ARGV[5], ARGV[6], ARGV[7], ARGV[8]
local job_key, retry_key = ARGV[9] .. job, ARGV[10] .. job
prune_running()
touch(ttl_ms)
if redis.call('ZSCORE', running, job) then
  redis.call('ZREM', waiting, job)
  return 1
end
local holders = redis.call('ZRANGE', running, 0, -1)
local ahead = 0
for i = 11, #ARGV do
  local row, runs = ARGV[i], false
  for _, holder in ipairs(holders) do
    if holder == row or string.sub(holder, 1, #row + 1) == row .. ':' then runs = true end
  end
  if not runs then ahead = ahead + 1 end
end
local free = cap - #holders
if free > ahead then
  redis.call('ZREM', waiting, job)
  redis.call('ZADD', running, now_ms, job)
  return 1
end
redis.call('ZADD', waiting, order, job)
if free > 0 then
  -- Older jobs of this user are due to take the free slots: make sure they are woken.
  wake(live_waiting(free))
end
redis.call('ZADD', queue, 'XX', park_until, job)
redis.call('PEXPIRE', job_key, keep_ms, 'GT')
if tonumber(redis.call('GET', retry_key) or '0') > 0 then
  redis.call('DECR', retry_key)
end
return 0
"""
)

# ARGV[5..]: the park-until score, the job key's keep, arq's job key prefix, then pairs of
# (arq id, order) of the user's younger open rows. Parks those that are due and that no worker
# has claimed, without a pickup each. Returns how many it parked.
PARK_YOUNGER = (
    _COMMON
    + """
local park_until, keep_ms, job_keys = ARGV[5], ARGV[6], ARGV[7]
local parked = 0
for i = 8, #ARGV, 2 do
  local member, member_order = ARGV[i], ARGV[i + 1]
  local score = redis.call('ZSCORE', queue, member)
  if score and tonumber(score) <= tonumber(now_ms)
      and redis.call('EXISTS', in_progress .. member) == 0
      and not redis.call('ZSCORE', running, member) then
    redis.call('ZADD', waiting, member_order, member)
    redis.call('ZADD', queue, 'XX', park_until, member)
    redis.call('PEXPIRE', job_keys .. member, keep_ms, 'GT')
    parked = parked + 1
  end
end
return parked
"""
)

# Returns how many waiting jobs were woken.
RELEASE = (
    _COMMON
    + """
local ttl_ms = ARGV[5]
redis.call('ZREM', running, job)
redis.call('ZREM', waiting, job)
prune_running()
local free = cap - redis.call('ZCARD', running)
local woken = {}
if free > 0 then
  woken = live_waiting(free)
  wake(woken)
end
touch(ttl_ms)
return #woken
"""
)
