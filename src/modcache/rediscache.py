"""The Redis adapter: reads the cache's state in a few round trips and applies plans atomically.

Everything that touches Redis for the module cache is here, in Lua scripts that never raise on what they find
(``TYPE`` guards and ``redis.pcall``) and never compare generations as numbers they cannot hold (generations are
compared as digit strings, bounded by ``keys.GENERATION_SLACK_US`` above the server clock):

* ``verify_manifest`` walks the manifest with plain HSCAN pages, judges each entry here, and checks each entry's
  content key server-side (``STRLENS``): present, a STRING, and exactly the length the entry records (the routine
  check; see ``docs/integrity.md`` for why it is sound);
* ``LENGTHS`` checks a batch of content keys by path the same way; ``VALUES`` compares whole values (``sha1`` of
  the stored value against the digest of what the source row makes: the deep check);
* ``APPLY`` writes a batch of plan items. Each item changes content key, index and manifest together (atomic per
  batch) and the batch bumps the generation once. It brackets its writes with two messages on
  ``KeySpace.writes_channel`` carrying a one-time nonce, so the key-event iterator (``modcache.keyevents``) can
  tell this process's own writes from everyone else's without checking them;
* ``GENERATION`` reads the generation counter, resetting it from the server clock if it is gone or unbelievable.

The fence that makes concurrent writers safe: a writer reads the generation *before* it reads the source, and
passes it to ``APPLY``; an item whose (believable) manifest entry was written at a later generation was written by
someone who read the source later, so it is skipped and reported as ``conflicted`` for the caller to re-check.

No name read back from Redis reaches a key here unless ``keys.KeySpace.name_problem`` accepted it: ``apply``
refuses any item whose path does not name a content key of this cache.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import hashlib
import itertools
import operator
import random
import secrets
import sys
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Iterable, Mapping, Sequence
from typing import Any, TypeVar

import redis.asyncio as aioredis
import redis.asyncio.cluster as aiocluster
import redis.exceptions

from modcache import errors, keys, plan

T = TypeVar("T")

# Statuses the check scripts return per key.
ABSENT, MATCH, OTHER, PRESENT, WRONGTYPE, MALFORMED, NOT_A_PATH = "-", "=", "~", "+", "t", "b", "x"
CORRUPT = "c"  # present, claims the expected hash (``"hash": "<hash>"``), but is not the value modcache writes

_DIGITS_LE = """
local function le(a, b) return #a < #b or (#a == #b and a <= b) end  -- digit strings without leading zeros
"""

# The manifest is walked with plain ``HSCAN`` pages and judged in Python (``keys.manifest_columns``); only the lengths
# are checked server-side. Walking it inside a script cost Redis three times the walk: every field and value
# converted into Lua, matched there, and converted back (0.35 s of Redis CPU per 100,000 entries, against 0.1 s for
# the HSCAN pages and 0.2 s for the lengths).
#
# KEYS: the generation (for routing only); ARGV: content keys (NUL-separated: a module path never holds a NUL, and the
# caller checked every one). Returns each key's length (0 when absent, -1 when not a STRING): the caller compares.
STRLENS = """
local s, out, pcall, find, sub = ARGV[1], {}, redis.pcall, string.find, string.sub
local pos, i = 1, 0
while true do
    local z = find(s, '\\0', pos, true)
    i = i + 1
    local got = pcall('STRLEN', sub(s, pos, (z or 0) - 1))
    if type(got) == 'table' then got = -1 end
    out[i] = got
    if not z then return out end
    pos = z + 1
end
"""

# The by-path checks (KEYS: the generation, for routing only) take their paths as one NUL-separated argument (a
# module path never holds a NUL; the caller has checked every one) and build each content key as the prefix plus its
# path: one argument per key, packed by redis-py in Python, was most of the client's time for 100,000 keys.
_SPLIT = """
local function split(s)
    local t, n = {}, 0
    for part in string.gmatch(s .. '\\0', '([^%z]*)%z') do n = n + 1; t[n] = part end
    return t
end
"""

# ARGV: content key prefix, paths, the expected length of each (comma-separated, '' = existence only).
LENGTHS = (
    _SPLIT
    + f"""
local prefix, paths, expected, k = ARGV[1], split(ARGV[2]), {{}}, 0
for n in string.gmatch(ARGV[3] .. ',', '([^,]*),') do k = k + 1; expected[k] = n end
local out = {{}}
for i, path in ipairs(paths) do
    local got = redis.pcall('STRLEN', prefix .. path)
    if type(got) == 'table' then out[i] = '{WRONGTYPE}'
    elseif got == 0 and redis.call('EXISTS', prefix .. path) == 0 then out[i] = '{ABSENT}'
    elseif expected[i] == '' then out[i] = '{PRESENT}'
    elseif got == tonumber(expected[i]) then out[i] = '{MATCH}'
    else out[i] = '{OTHER}' end
end
return table.concat(out)
"""
)

# ARGV: content key prefix, paths, how each value must end (``modules.cached_tail``, NUL-separated: JSON escapes
# a NUL). Returns {per key its status (``MATCH`` when a STRING ends so, else ``ABSENT``/``WRONGTYPE``/``OTHER``),
# the lengths (comma-separated, '' unless MATCH)}.
CLAIMS = (
    _SPLIT
    + f"""
local prefix, paths, tails = ARGV[1], split(ARGV[2]), split(ARGV[3])
local codes, lengths, pcall = {{}}, {{}}, redis.pcall
for i, path in ipairs(paths) do
    local key, tail = prefix .. path, tails[i]
    local got = pcall('GETRANGE', key, -#tail, -1)
    lengths[i] = ''
    if type(got) == 'table' then codes[i] = '{WRONGTYPE}'
    elseif got == tail then codes[i] = '{MATCH}'; lengths[i] = tostring(redis.call('STRLEN', key))
    elseif got == '' and redis.call('EXISTS', key) == 0 then codes[i] = '{ABSENT}'
    else codes[i] = '{OTHER}' end
end
return {{table.concat(codes), table.concat(lengths, ',')}}
"""
)

# ARGV: content key prefix, paths, then per key the sha1 (hex, 40 characters each) of the value it should hold, and
# the module hash (64 characters each).
VALUES = (
    _SPLIT
    + f"""
local prefix, paths, sums, hashes = ARGV[1], split(ARGV[2]), ARGV[3], ARGV[4]
local out, sha, sub = {{}}, redis.sha1hex, string.sub
for i, path in ipairs(paths) do
    local value = redis.pcall('GET', prefix .. path)
    if type(value) == 'table' then out[i] = '{WRONGTYPE}'
    elseif not value then out[i] = '{ABSENT}'
    elseif sha(value) == sub(sums, 40 * i - 39, 40 * i) then out[i] = '{MATCH}'
    elseif string.find(value, '"hash": "' .. sub(hashes, 64 * i - 63, 64 * i) .. '"', 1, true) then
        out[i] = '{CORRUPT}'
    else out[i] = '{OTHER}' end
end
return table.concat(out)
"""
)

# ARGV: content key prefix, paths, the module hash each should hold (64 characters each). For keys whose length was
# not the recorded one: ``CORRUPT`` when the value claims the hash (``"hash": "<hash>"``), else ``OTHER`` (another
# version), or what the key has become since (``ABSENT``, ``WRONGTYPE``).
CLAIMED = (
    _SPLIT
    + f"""
local prefix, paths, hashes = ARGV[1], split(ARGV[2]), ARGV[3]
local out, sub = {{}}, string.sub
for i, path in ipairs(paths) do
    local value = redis.pcall('GET', prefix .. path)
    if type(value) == 'table' then out[i] = '{WRONGTYPE}'
    elseif not value then out[i] = '{ABSENT}'
    elseif string.find(value, '"hash": "' .. sub(hashes, 64 * i - 63, 64 * i) .. '"', 1, true) then
        out[i] = '{CORRUPT}'
    else out[i] = '{OTHER}' end
end
return table.concat(out)
"""
)

# KEYS: generation, index, manifest, status; ARGV: slack (us). Returns {generation, problem ('' if it was
# believable), server clock (us), the types of index, manifest and status}.
GENERATION = """
local t = redis.call('TIME')
local now = t[1] .. string.format('%06d', tonumber(t[2]))
local kind = redis.call('TYPE', KEYS[1])['ok']
local g = kind == 'string' and redis.call('GET', KEYS[1]) or nil
local problem = ''
if kind ~= 'string' and kind ~= 'none' then problem = 'wrong type: ' .. kind
elseif not g then problem = 'missing'
elseif #g > 18 or not string.match(g, '^[1-9]%d*$') then problem = 'not a positive integer'
elseif tonumber(g) > tonumber(now) + tonumber(ARGV[1]) then problem = 'far above the server clock' end
if problem ~= '' then
    g = now
    redis.call('DEL', KEYS[1])
    redis.call('SET', KEYS[1], g)
end
return {g, problem, now, redis.call('TYPE', KEYS[2])['ok'], redis.call('TYPE', KEYS[3])['ok'],
        redis.call('TYPE', KEYS[4])['ok']}
"""

# KEYS: generation, index, manifest, status. Reads only: {server clock seconds, microseconds, the four keys' types,
# the generation's raw value ('' unless it is a string)}. One script, not a MULTI with TIME: a cluster refuses
# keyless commands in a transaction, and a script runs on the node owning the keys' slot.
PEEK = """
local t = redis.call('TIME')
local out = {t[1], t[2]}
for i = 1, 4 do out[#out + 1] = redis.call('TYPE', KEYS[i])['ok'] end
out[#out + 1] = out[3] == 'string' and redis.call('GET', KEYS[1]) or ''
return out
"""

# KEYS: generation; ARGV: a believable generation the counter must reach. Returns the counter afterwards.
RAISE = (
    _DIGITS_LE
    + """
local g = redis.call('GET', KEYS[1])
if not g or not string.match(g, '^[1-9]%d*$') or not le(ARGV[1], g) then
    g = string.format('%.0f', tonumber(ARGV[1]) + 1)
    redis.call('SET', KEYS[1], g)
    return {g, 1}
end
return {g, 0}
"""
)

# KEYS: generation, index, manifest, expected index, expected manifest, spare manifest (``KeySpace.expected``: the same
# changes of index and manifest go to their copies); ARGV: fence, ttl_s, ttl_jitter_s, seed, nonce, writes channel,
# highest believable generation, content key prefix, then the items in four columns: their ops (one character each),
# their hashes (64 characters each, spaces when none), their lengths (comma-separated, '' when none), their paths
# (NUL-separated; a module path never holds a NUL, and a 'u' item's entry is empty), then the name of each 'u' item (any
# bytes: it names no content key) and the value of each 'p' item, in order. Columns, not five arguments per item:
# redis-py packs each argument in Python, which was most of the client's time for 100,000 items. A content key is the
# prefix plus its path (``RedisCache.apply`` has checked every path). Returns {one character per item ('a' applied, 'c'
# conflicted, 'm' content moved on: not reindexed), repairs made ('1'/'2'/'3' a key of the wrong type deleted, 'g'
# generation reset, 'l' generation raised to the manifest's), the generation written}.
APPLY = (
    # the shebang makes Redis refuse the script as a whole when it is out of memory, before its first PUBLISH: a
    # script that published ``b:`` and then failed would leave the key-event iterator inside a write that never ends
    "#!lua\n"
    + _DIGITS_LE
    + """
local call = redis.call
local fence, limit = ARGV[1], ARGV[7]
local ttl, jitter, seed = tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
call('PUBLISH', ARGV[6], 'b:' .. ARGV[5])
local repaired, wanted = '', {'string', 'set', 'hash', 'set', 'hash', 'hash'}
for i = 1, 6 do
    local kind = call('TYPE', KEYS[i])['ok']
    if kind ~= 'none' and kind ~= wanted[i] then call('DEL', KEYS[i]); repaired = repaired .. i end
end
local g = call('GET', KEYS[1])
if not g or not string.match(g, '^[1-9]%d*$') or not le(g, limit) then
    local t = call('TIME')
    g = t[1] .. string.format('%06d', tonumber(t[2]))
    repaired = repaired .. 'g'
end
local prefix, ops, hashes = ARGV[8], ARGV[9], ARGV[10]
local n, lens, paths, k, extra = #ops, {}, {}, 0, 12
for l in string.gmatch(ARGV[11] .. ',', '([^,]*),') do k = k + 1; lens[k] = l end
k = 0
for p in string.gmatch(ARGV[12] .. '\\0', '([^%z]*)%z') do
    k = k + 1
    if string.sub(ops, k, k) == 'u' then extra = extra + 1; p = ARGV[extra] end
    paths[k] = p
end
local held = {}
for i = 1, n do
    local h = call('HGET', KEYS[3], paths[i])
    local hg = h and string.match(h, '^([1-9]%d*):')
    if hg and le(hg, limit) then
        held[i] = hg
        if not le(hg, g) then g = hg; repaired = repaired .. 'l' end
    end
end
local gen = string.format('%.0f', tonumber(g) + 1)
call('SET', KEYS[1], gen)
local out, put, gone, listed, entries = {}, extra, {}, {}, {}
for i = 1, n do
    local op, path, len = string.sub(ops, i, i), paths[i], lens[i]
    local key = op == 'u' and KEYS[2] or prefix .. path
    local hash = string.sub(hashes, 64 * i - 63, 64 * i)
    if op == 'p' then put = put + 1 end
    if held[i] and not le(held[i], fence) then
        out[i] = 'c'
    elseif op == 'r' and (call('TYPE', key)['ok'] ~= 'string'
                          or (len ~= '' and call('STRLEN', key) ~= tonumber(len))) then
        out[i] = 'm'
    else
        if op == 'd' or op == 'u' then
            if op == 'd' then call('DEL', key) end
            gone[#gone + 1] = path
        else
            if op == 'p' then
                if ttl > 0 then
                    call('SET', key, ARGV[put], 'EX', ttl + (((i + 3) * 7919 + seed) % (jitter + 1)))
                else
                    call('SET', key, ARGV[put])
                end
            end
            listed[#listed + 1] = path
            if len ~= '' then
                entries[#entries + 1] = path
                entries[#entries + 1] = gen .. ':' .. hash .. ':' .. len
            end
        end
        out[i] = 'a'
    end
end
-- the index and manifest changes go in a few calls, not one per item: a 5,000-item batch was 10,000 calls and as
-- many keyspace events for the key-event iterator to read past
local function each(command, key, list)
    for i = 1, #list, 1000 do call(command, key, unpack(list, i, math.min(i + 999, #list))) end
end
for copy = 0, 2, 2 do  -- the index and the manifest, then their expected copies
    each('SREM', KEYS[2 + copy], gone)
    each('HDEL', KEYS[3 + copy], gone)
    each('SADD', KEYS[2 + copy], listed)
    each('HSET', KEYS[3 + copy], entries)
end
each('HDEL', KEYS[6], gone)
each('HSET', KEYS[6], entries)
call('PUBLISH', ARGV[6], 'e:' .. ARGV[5])
return {table.concat(out), repaired, gen}
"""
)

# KEYS: content keys; ARGV: ttl_s, ttl_jitter_s, seed, nonce, writes channel. Refreshes the TTL of keys that exist,
# between the same markers as APPLY: the key-event iterator must not take 100,000 ``expire`` events of our own for
# foreign writes (each one a whole-value comparison).
TOUCH = """#!lua
local ttl, jitter, seed = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
redis.call('PUBLISH', ARGV[5], 'b:' .. ARGV[4])
for i, key in ipairs(KEYS) do
    redis.call('EXPIRE', key, ttl + ((i * 7919 + seed) % (jitter + 1)))
end
redis.call('PUBLISH', ARGV[5], 'e:' .. ARGV[4])
return #KEYS
"""

# KEYS: status; ARGV: nonce, writes channel, then field, value, ... Replaces the whole status hash, between the
# markers (our own ``del``/``hset`` events must not read as a foreign change of the record).
STATUS = """#!lua
redis.call('PUBLISH', ARGV[2], 'b:' .. ARGV[1])
redis.call('DEL', KEYS[1])
redis.call('HSET', KEYS[1], unpack(ARGV, 3))
redis.call('PUBLISH', ARGV[2], 'e:' .. ARGV[1])
return 1
"""

# KEYS: index, expected index; ARGV: nonce, writes channel, what to look for ('-' members removed, '+' added, or
# both), the most names to return. Returns {'' or why the copy cannot be used, the names that differ...}; the copy
# is made to agree with the index for those names in the same script (between the markers: events after it are
# compared with what the index held now). Two SDIFFs in C, no member converted into Lua but the differences.
INDEX_CHANGES = """#!lua
local call = redis.call
local index, copy = call('TYPE', KEYS[1])['ok'], call('TYPE', KEYS[2])['ok']
if index ~= 'set' and index ~= 'none' then return {'the index is a ' .. index} end
if copy ~= 'set' then return {copy == 'none' and index == 'none' and '' or 'no expected index'} end
local removed, added = {}, {}
if string.find(ARGV[3], '-', 1, true) then removed = call('SDIFF', KEYS[2], KEYS[1]) end
if string.find(ARGV[3], '+', 1, true) then added = call('SDIFF', KEYS[1], KEYS[2]) end
if #removed + #added > tonumber(ARGV[4]) then return {'too many changed members'} end
call('PUBLISH', ARGV[2], 'b:' .. ARGV[1])
for i = 1, #removed, 1000 do call('SREM', KEYS[2], unpack(removed, i, math.min(i + 999, #removed))) end
for i = 1, #added, 1000 do call('SADD', KEYS[2], unpack(added, i, math.min(i + 999, #added))) end
call('PUBLISH', ARGV[2], 'e:' .. ARGV[1])
local out = {''}
for _, name in ipairs(removed) do out[#out + 1] = name end
for _, name in ipairs(added) do out[#out + 1] = name end
return out
"""

# KEYS: manifest, expected manifest, spare manifest; ARGV: nonce, writes channel, HSCAN cursor, page size, 'f' (walk the
# manifest: fields whose value the copy does not hold) or 'r' (walk the copy: fields the manifest lost). Returns {next
# cursor, '' or why the copy cannot be used, the fields that differ...}, the copy made to agree for them (between
# markers). Redis has no C-level diff of two hashes: this one is O(entries) in Lua, paged so Redis never stalls for
# long.
MANIFEST_CHANGES = """#!lua
local call = redis.call
local manifest, copy = call('TYPE', KEYS[1])['ok'], call('TYPE', KEYS[2])['ok']
if manifest ~= 'hash' and manifest ~= 'none' then return {'0', 'the manifest is a ' .. manifest} end
-- no manifest to compare with: every field would differ, and the copy made to agree would lose them all
if manifest == 'none' and copy == 'hash' then return {'0', 'no manifest'} end
if copy ~= 'hash' then return {'0', copy == 'none' and manifest == 'none' and '' or 'no expected manifest'} end
local walked, other = KEYS[1], KEYS[2]
if ARGV[5] == 'r' then walked, other = KEYS[2], KEYS[1] end
local page = call('HSCAN', walked, ARGV[3], 'COUNT', ARGV[4])
local entries, fields, changed = page[2], {}, {page[1], ''}
for i = 1, #entries, 2 do fields[#fields + 1] = entries[i] end
if #fields == 0 then return changed end
local there, spare, walking = {}, {}, ARGV[5] == 'f'
for i = 1, #fields, 1000 do  -- an HSCAN page may hold more than its COUNT; unpack takes 8,000 at most
    local got = call('HMGET', other, unpack(fields, i, math.min(i + 999, #fields)))
    for j = 1, #got do there[i + j - 1] = got[j] end
    if walking then  -- the spare is compared with the manifest too (and written only where it differs)
        got = call('HMGET', KEYS[3], unpack(fields, i, math.min(i + 999, #fields)))
        for j = 1, #got do spare[i + j - 1] = got[j] end
    end
end
call('PUBLISH', ARGV[2], 'b:' .. ARGV[1])
for i, field in ipairs(fields) do
    if walking and there[i] == entries[2 * i] and spare[i] ~= entries[2 * i] then
        call('HSET', KEYS[3], field, entries[2 * i])
    elseif there[i] ~= entries[2 * i] then
        changed[#changed + 1] = field
        local now = call('HGET', KEYS[1], field)
        for c = 2, 3 do
            if now then call('HSET', KEYS[c], field, now) else call('HDEL', KEYS[c], field) end
        end
    end
end
call('PUBLISH', ARGV[2], 'e:' .. ARGV[1])
return changed
"""

# KEYS: index, manifest, expected index, expected manifest, spare manifest; ARGV: nonce, writes channel, '1' to rebuild
# whatever is found ('2': the spare only). Makes each copy a COPY of the original unless it is of the same type with as
# many members (O(1) then), or the original is gone (a DEL, an eviction: the copy is what is left of it, and the full
# resync that follows rebuilds the original through APPLY, which writes both alike); returns 1 if one was rebuilt.
EXPECTED = """#!lua
local call = redis.call
local function agree(a, b, count)  -- b, a copy, of a's type and size and without a TTL (a COPY would carry it on)
    local kind = call('TYPE', a)['ok']
    if kind ~= call('TYPE', b)['ok'] then return false end
    return kind == 'none' or call(count, a) == call(count, b) and call('PTTL', b) == -1
end
local rebuilt = 0
call('PUBLISH', ARGV[2], 'b:' .. ARGV[1])
for i = 1, 2 do  -- index and manifest never expire (a TTL someone put there would take both at a time of theirs)
    if call('PTTL', KEYS[i]) >= 0 then call('PERSIST', KEYS[i]) end
end
for i, count in ipairs({'SCARD', 'HLEN'}) do
    local original, copy = KEYS[i], KEYS[i + 2]
    local kind = call('TYPE', original)['ok']
    local wanted = i == 1 and 'set' or 'hash'
    if ARGV[3] == '1' or kind ~= wanted and kind ~= 'none' or kind == wanted and not agree(original, copy, count) then
        call('DEL', copy)
        if kind == wanted then call('COPY', original, copy); call('PERSIST', copy) end
        rebuilt = 1
    end
end
-- the spare: a copy of the expected manifest, rebuilt with it or when their sizes differ (a member check compares
-- the rest: ``MANIFEST_CHANGES``)
if ARGV[3] == '1' or rebuilt == 1 or not agree(KEYS[4], KEYS[5], 'HLEN') then
    call('DEL', KEYS[5])
    if call('TYPE', KEYS[4])['ok'] == 'hash' then call('COPY', KEYS[4], KEYS[5]); call('PERSIST', KEYS[5]) end
end
call('PUBLISH', ARGV[2], 'e:' .. ARGV[1])
return rebuilt
"""

# KEYS: index, manifest, expected index, expected manifest; ARGV: content key prefix, sample size. Reads only: their
# types, then how many of a random sample of the expected index's members have no content key, and its size.
BOOKKEEPING = """
local out = {}
for i, key in ipairs(KEYS) do out[i] = redis.call('TYPE', key)['ok'] end
local missing, size = 0, 0
if out[3] == 'set' then
    size = redis.call('SCARD', KEYS[3])
    for _, name in ipairs(redis.call('SRANDMEMBER', KEYS[3], tonumber(ARGV[2]))) do
        if redis.call('EXISTS', ARGV[1] .. name) == 0 then missing = missing + 1 end
    end
end
out[5] = missing
out[6] = size
return out
"""
SAMPLE = 16

# KEYS: original (index or manifest), its expected copy; ARGV: nonce, writes channel, the type both must have. Puts
# the copy in the original's place (a COPY in C: ~100,000 members in tens of milliseconds) when the copy is of that
# type, unless the original looks intact (its type, no TTL, as many members: 2 is returned, and a member check tells;
# anyone may PUBLISH a forged ``del`` notification: attack-9e E3); returns 1 if it did. For a key someone else
# deleted, renamed, expired or replaced: what modcache last wrote there, back at once (a full resync then compares).
FROM_COPY = """#!lua
local call = redis.call
if call('TYPE', KEYS[2])['ok'] ~= ARGV[3] then return 0 end
local count = ARGV[3] == 'set' and 'SCARD' or 'HLEN'
local kind, ttl = call('TYPE', KEYS[1])['ok'], call('PTTL', KEYS[1])
if kind == ARGV[3] and ttl == -1 and call(count, KEYS[1]) == call(count, KEYS[2]) then return 2 end
call('PUBLISH', ARGV[2], 'b:' .. ARGV[1])
call('UNLINK', KEYS[1])  -- freed in the background: the DEL of 100,000 entries held Redis ~7 ms more
call('COPY', KEYS[2], KEYS[1])
call('PERSIST', KEYS[1])  -- a TTL someone put on the copy stays there (and makes the next settle rebuild it)
call('PUBLISH', ARGV[2], 'e:' .. ARGV[1])
return 1
"""

# KEYS: manifest, expected manifest, spare manifest; ARGV: nonce, writes channel, the most entries to put back. For a
# manifest whose fields someone else changed (HSET, HDEL: the event names no field, and Redis has no C-level diff of two
# hashes): the expected copy, what modcache last wrote, is put in its place -- by RENAME (O(1)) when the spare agrees in
# size, which makes the copy again afterwards (``RESPARE``: 3 is returned), else by COPY (~45 ms at 100,000 entries: 1).
# 0: no copy to believe; 2: more entries than allowed (a paged member check tells; one COPY would hold Redis too long).
PUT_BACK = """#!lua
local call = redis.call
if call('TYPE', KEYS[2])['ok'] ~= 'hash' then return 0 end
local n = call('HLEN', KEYS[2])
if n > tonumber(ARGV[3]) then return 2 end
local spare = call('TYPE', KEYS[3])['ok'] == 'hash' and call('HLEN', KEYS[3]) == n
call('PUBLISH', ARGV[2], 'b:' .. ARGV[1])
call('UNLINK', KEYS[1])  -- freed in the background
if spare then call('RENAME', KEYS[2], KEYS[1]) else call('COPY', KEYS[2], KEYS[1]) end
call('PERSIST', KEYS[1])  -- RENAME and COPY carry a TTL on: never onto the manifest (attack-10 E4)
call('PUBLISH', ARGV[2], 'e:' .. ARGV[1])
return spare and 3 or 1
"""

# KEYS: expected manifest, spare manifest; ARGV: nonce, writes channel. After ``PUT_BACK`` renamed the copy away: the
# copy made again from the spare (which every ``APPLY`` since wrote too, and nobody else did unheard).
RESPARE = """#!lua
local call = redis.call
if call('TYPE', KEYS[2])['ok'] ~= 'hash' then return 0 end
call('PUBLISH', ARGV[2], 'b:' .. ARGV[1])
call('UNLINK', KEYS[1])
call('COPY', KEYS[2], KEYS[1])
call('PERSIST', KEYS[1])
call('PUBLISH', ARGV[2], 'e:' .. ARGV[1])
return 1
"""

_OP_CODES = {
    plan.Operation.PUT: "p",
    plan.Operation.DELETE: "d",
    plan.Operation.REINDEX: "r",
    plan.Operation.UNLIST: "u",
}
_NO_HASH = " " * 64
_WANTED_TYPES = {"index": "set", "manifest": "hash", "generation": "string", "status": "hash"}
_APPLY_REPAIRS = {"1": "generation", "2": "index", "3": "manifest"}
#: Index members per SSCAN page (a few milliseconds of Redis each; one call per page, whatever the cache's size).
INDEX_PAGE = 10_000
#: Members up to which a full resync reads the index in one ``SMEMBERS`` (~20 ms of Redis at 100,000, against ~60-70
#: ms for the same members in ``SSCAN`` pages); a bigger one in pages.
WHOLE_READ = 100_000
#: Manifest entries per HSCAN page of a full resync, whose content keys' lengths are then checked in one call (a few
#: milliseconds of Redis each).
MANIFEST_PAGE = 5_000
#: How close to ``maxmemory`` Redis must be to count as evicting for lack of memory (it evicts to stay just below).
MEMORY_LIMIT_MARGIN = 0.1
#: Members found changed by someone else beyond which a full resync repairs them rather than one by one.
MAX_CHANGED = 10_000
#: The most entries a manifest put back after member events may have: the COPY that makes its copy again holds Redis
#: for its whole length (~45 ms at 100,000 entries); a bigger one is compared page by page instead.
MAX_PUT_BACK = 250_000
#: Nonces of writes in flight that a key-event iterator may still have to recognise (bounded: oldest dropped).
MAX_OWN_WRITES = 10_000

#: The clients ``wiring.make_redis`` builds: one node or a Sentinel-managed master (``Redis``), or a Cluster.
Client = aioredis.Redis | aiocluster.RedisCluster


@dataclasses.dataclass(frozen=True, slots=True)
class Write:
    """One plan item ready for APPLY: the item plus, for PUT, the JSON value to store (its length goes into the
    manifest entry; a REINDEX may carry the value's length without the value)."""

    item: plan.Item
    value: str = ""
    length: int | None = None

    def recorded_length(self) -> str:
        if self.value:
            return str(len(self.value.encode()))
        return "" if self.length is None else str(self.length)


@dataclasses.dataclass(frozen=True)
class Applied:
    applied: tuple[plan.Item, ...]
    conflicted: tuple[plan.Item, ...]
    moved: tuple[plan.Item, ...] = ()  # REINDEX items whose content key changed since it was checked
    repairs: tuple[plan.KeyRepair, ...] = ()


@dataclasses.dataclass(frozen=True)
class Generation:
    """The generation as read (after any reset), what was wrong with it, and the server clock."""

    value: int
    problem: str
    clock_us: int
    wrong_types: tuple[plan.KeyRepair, ...] = ()  # index, manifest, status keys of the wrong type

    @property
    def limit(self) -> int:
        """The highest generation anyone could believably have written."""
        return self.clock_us + keys.GENERATION_SLACK_US


@dataclasses.dataclass(frozen=True)
class VerifiedPage:
    """One verified manifest page: path -> manifest hash for believable entries, the status of each entry's content
    key, the names that cannot be content keys, the malformed entries, and the highest believable generation seen."""

    hashes: dict[str, str]
    codes: dict[str, str]  # only the entries whose content key did not match (few)
    not_paths: list[str]
    malformed: list[str]
    top_generation: int
    # ``hashes`` as two parallel lists, its names and its hashes in order (compared at C level with the source's)
    names: list[str] = dataclasses.field(default_factory=list)
    digests: list[str] = dataclasses.field(default_factory=list)


class RedisCache:
    """One module cache (one key prefix on one Redis database)."""

    def __init__(
        self,
        *,
        client: Client,
        keyspace: keys.KeySpace,
        ttl_s: int | None = None,
        ttl_jitter_ratio: float = 0.2,
        check_batch_size: int = 5000,
        deep_batch_size: int = 500,
        close: Callable[[], Awaitable[None]] | None = None,
        master_switches: Callable[[], AsyncIterator[str]] | None = None,
    ) -> None:
        self.client = client
        # Sentinel: each new master's ``host:port`` the moment the sentinels switch (``sentinels.Quorum.switches``);
        # the key-event iterator reconnects on it rather than waiting for the old master to refuse a write
        self.master_switches = master_switches
        self._close = close or client.aclose
        self.keyspace = keyspace
        self._ttl_s = ttl_s or 0
        self._ttl_jitter_s = int(self._ttl_s * ttl_jitter_ratio)
        self._check_batch_size = check_batch_size
        self._deep_batch_size = deep_batch_size
        self._strlens = client.register_script(STRLENS)
        self._claimed = client.register_script(CLAIMED)
        self._lengths = client.register_script(LENGTHS)
        self._values = client.register_script(VALUES)
        self._claims = client.register_script(CLAIMS)
        self._apply = client.register_script(APPLY)
        self._generation = client.register_script(GENERATION)
        self._raise = client.register_script(RAISE)
        self._touch = client.register_script(TOUCH)
        self._status = client.register_script(STATUS)
        self._peek = client.register_script(PEEK)
        self._index_changes = client.register_script(INDEX_CHANGES)
        self._manifest_changes = client.register_script(MANIFEST_CHANGES)
        self._expected = client.register_script(EXPECTED)
        self._from_copy = client.register_script(FROM_COPY)
        self._put_back = client.register_script(PUT_BACK)
        self._respare = client.register_script(RESPARE)
        self._bookkeeping = client.register_script(BOOKKEEPING)
        # the key a by-path script is sent with: it names no key itself, and a Cluster routes a script by its keys (a
        # Cluster cache's prefix carries a hash tag, so every key of the cache lives in this key's slot)
        self._route = [keyspace.generation]
        # nonce -> the write's number (``writes_issued`` when it was made) of the writes a key-event iterator may
        # still have to recognise
        self.own_writes: collections.OrderedDict[str, int] = collections.OrderedDict()
        self.writes_issued = 0  # APPLY calls this process made (each write's number, in the order they were made)
        self.writes_heard = 0  # the highest number of an own write whose begin marker the key events delivered
        self.tracking_own_writes = False  # set by a key-event iterator while it needs the nonces
        self.aborted_writes: set[str] = set()  # nonces of writes that failed: their end marker never comes
        self.high_water = 0  # the highest generation this process has read or written

    @classmethod
    def from_url(cls, url: str, *, keyspace: keys.KeySpace, **options: Any) -> RedisCache:
        return cls(client=client_from_url(url), keyspace=keyspace, **options)

    async def close(self) -> None:
        await self._close()

    # -- the node holding the cache --------------------------------------------------------------------------

    @property
    def database(self) -> int:
        """The database number the keys live in (always 0 on a Cluster)."""
        if isinstance(self.client, aiocluster.RedisCluster):
            return 0
        return int(self.client.connection_pool.connection_kwargs.get("db", 0) or 0)

    async def open_node_connection(self) -> Any:
        """A connection of its own (RESP2, for Pub/Sub and ``WATCH``) to the node holding this cache's keys *now*:
        the one node; the master a Sentinel names (asked again on every connect); or the Cluster node that owns
        the prefix's slot (the slot table is read again first: after a failover or a resharding the owner moved).
        Keyspace notifications are per node, so this is where they must be subscribed."""
        client = self.client
        conn: Any
        if isinstance(client, aiocluster.RedisCluster):
            await _call(client.initialize())  # once per client; the node table must exist before it is refreshed
            await _call(client.nodes_manager.initialize())
            node = client.get_node_from_key(self.keyspace.generation)
            if node is None:
                raise errors.CacheUnavailable("no Cluster node serves the cache's slot")
            conn = node.connection_class(**{**node.connection_kwargs, "protocol": 2})
        else:
            pool = client.connection_pool
            conn = pool.connection_class(**{**pool.connection_kwargs, "protocol": 2})
        await conn.connect()
        return conn

    async def ping(self) -> None:
        await _call(self.client.ping())

    async def at_memory_limit(self) -> bool | None:
        """Whether Redis holds within ``MEMORY_LIMIT_MARGIN`` of its ``maxmemory`` now (where it evicts to stay), or
        None when ``INFO`` is not permitted (the writer's ACL may leave it out) or Redis cannot be asked."""
        try:
            found = await self.client.info("memory")
        except (redis.exceptions.RedisError, OSError):
            return None
        limit, used = int(found.get("maxmemory", 0) or 0), int(found.get("used_memory", 0) or 0)
        return bool(limit) and used >= limit * (1 - MEMORY_LIMIT_MARGIN)

    async def evictions(self) -> int | None:
        """How many keys Redis has evicted since it started (``INFO stats``), or None when ``INFO`` is not permitted
        or Redis cannot be asked. Unlike ``used_memory`` (well below ``maxmemory`` right after an eviction burst), a
        count that grew proves evictions happened meanwhile, and no PUBLISH can make it grow."""
        try:
            found = await self.client.info("stats")
        except (redis.exceptions.RedisError, OSError):
            return None
        count = found.get("evicted_keys")
        return int(count) if isinstance(count, int | str) and str(count).isdigit() else None

    # -- the generation ---------------------------------------------------------------------------------------

    async def generation(self, *, create: bool = True) -> int:
        """The current generation; read it *before* reading the source and pass it to ``apply``."""
        return (await self.read_generation(create=create)).value

    async def read_generation(self, *, create: bool = True) -> Generation:
        """The generation, reset from the server clock if it is missing or unbelievable -- unless ``create`` is
        false (dry runs write nothing): then an unbelievable one reads as 0, with the problem said. Also reports
        which of modcache's other keys (index, manifest, status) exist with the wrong type."""
        ks = self.keyspace
        if create:
            others = [ks.index, ks.manifest, ks.status]
            value, problem, now, *kinds = await _call(
                self._generation(keys=[ks.generation, *others], args=[keys.GENERATION_SLACK_US])
            )
            read = Generation(int(value), str(problem), int(now), self._wrong(kinds))
        else:
            read = await self._peek_generation()
        self.high_water = max(self.high_water, read.value)
        return read

    def _wrong(self, kinds: Sequence[Any]) -> tuple[plan.KeyRepair, ...]:
        roles = {"index": self.keyspace.index, "manifest": self.keyspace.manifest, "status": self.keyspace.status}
        return tuple(
            plan.KeyRepair(role, key, f"wrong type: {kind}")
            for (role, key), kind in zip(roles.items(), map(str, kinds), strict=True)
            if kind not in ("none", _WANTED_TYPES[role])
        )

    async def _peek_generation(self) -> Generation:
        ks = self.keyspace
        seconds, micros, kind, *kinds, value = await _call(
            self._peek(keys=[ks.generation, ks.index, ks.manifest, ks.status])
        )
        clock_us = int(seconds) * 1_000_000 + int(micros)
        raw = str(value) if kind == "string" else None
        problem = f"wrong type: {kind}" if kind not in ("string", "none") else None
        problem = problem or keys.generation_problem(raw, clock_us=clock_us)
        return Generation(0 if problem else int(str(raw)), problem or "", clock_us, self._wrong(kinds))

    async def raise_generation(self, at_least: int) -> bool:
        """Make the counter reach ``at_least`` (a believable generation found in the manifest); whether it was
        below (another writer may have moved it past meanwhile: then nothing was wrong)."""
        value, raised = await _call(self._raise(keys=[self.keyspace.generation], args=[str(at_least)]))
        self.high_water = max(self.high_water, int(value))
        return bool(raised)

    # -- bookkeeping keys -----------------------------------------------------------------------------------------

    async def reset(self, repairs: Iterable[plan.KeyRepair]) -> None:
        """Delete modcache's own keys that were found of the wrong type (they are rebuilt from the source)."""
        owned = set(self.keyspace.bookkeeping().values())
        doomed = [r.key for r in repairs if r.key in owned and r.role != "generation"]
        if doomed:
            await _call(self.client.delete(*doomed))

    # -- reading the cache ------------------------------------------------------------------------------------

    async def read_index(self) -> frozenset[str] | None:
        """The index members, or None if the index key is not a SET.

        Read whole by one ``SMEMBERS`` up to ``WHOLE_READ`` members (a fifth of the Redis time of ``SSCAN`` pages), else
        in ``SSCAN`` pages of ``INDEX_PAGE`` members (one ``SMEMBERS`` of a 1,000,000-member index is one call whose
        duration grows with the cache and ran past the socket timeout); members added or removed while the pages are
        read are reported by their key events (the index's, which ask for another resync)."""
        index = self.keyspace.index
        try:
            whole = await _call(self._whole_set(index))
        except _WrongType:
            return None
        if whole is not None:
            return whole
        pages: list[list[str]] = []
        cursor = 0
        while True:
            try:
                cursor, page = await _call(self._sscan(index, cursor))
            except _WrongType:
                return None
            pages.append(page)
            if cursor == 0:
                return frozenset(itertools.chain.from_iterable(pages))  # one pass: no set copied into a frozenset

    async def verify_manifest(self, *, limit: int, lengths: bool = True) -> AsyncIterator[VerifiedPage]:
        """The manifest, page by page (``_manifest_pages``, each judged here), each entry's content key checked
        against the length it records (``STRLENS``, one call per page). A page's lengths are checked while the next
        one is read and judged, so Redis works while this process does."""
        checking: collections.deque[asyncio.Future[VerifiedPage]] = collections.deque()
        pages = self._manifest_pages()
        try:
            async for fields in pages:
                checking.append(asyncio.ensure_future(self._checked(*_judged_page(fields, limit), lengths=lengths)))
                if len(checking) > 1:
                    yield await checking.popleft()
            while checking:
                yield await checking.popleft()
        finally:
            await pages.aclose()
            for pending in checking:
                _discard(pending)

    async def _manifest_pages(self) -> AsyncGenerator[dict[str, str], None]:
        """The manifest's entries in ``HSCAN`` pages of ``MANIFEST_PAGE`` (at least one page; none once it is not a
        hash), the next asked for as soon as one arrives. Not one ``HGETALL``, though Redis spends a quarter of the
        time on it: the whole manifest held at once raised the operator's peak during a no-drift resync at 100,000
        modules from 193 to 214 MB (its target is 200), for 0.15 s of the resync's ~0.7 s."""
        scanning: asyncio.Future[tuple[int, dict[str, str]]] | None = asyncio.ensure_future(self._manifest_page(0))
        try:
            while scanning is not None:
                cursor, fields = await scanning
                scanning = None if cursor == 0 else asyncio.ensure_future(self._manifest_page(cursor))
                yield fields
        finally:
            _discard(scanning)

    async def _whole_set(self, key: str) -> frozenset[str] | None:
        """The members of the SET ``key`` if it has at most ``WHOLE_READ`` (none if absent), else None."""
        try:
            if await self.client.scard(key) > WHOLE_READ:
                return None
            members: set[str] = await self.client.smembers(key)  # type: ignore[assignment]
        except redis.exceptions.ResponseError as e:
            if str(e).startswith("WRONGTYPE"):
                raise _WrongType from None
            raise
        return frozenset(members)

    async def _manifest_page(self, cursor: int) -> tuple[int, dict[str, str]]:
        """One ``HSCAN`` page of the manifest (none, ending the walk, once it is not a hash: it is rebuilt)."""

        async def page() -> tuple[int, dict[str, str]]:
            try:
                found = await self.client.hscan(self.keyspace.manifest, cursor, count=MANIFEST_PAGE)
            except redis.exceptions.ResponseError as e:
                if str(e).startswith("WRONGTYPE"):
                    return 0, {}
                raise
            fields: dict[str, str] = found[1]  # type: ignore[assignment]  # decoded: the client decodes replies
            return int(found[0]), fields

        return await _call(page())

    async def _checked(
        self, page: VerifiedPage, names: Sequence[str], recorded: Sequence[int], *, lengths: bool
    ) -> VerifiedPage:
        """``page`` with the codes of the entries whose content key is not a STRING of the recorded length."""
        if not lengths or not names:
            return page
        prefix = self.keyspace.prefix
        got = await _call(self._strlens(keys=self._route, args=[prefix + ("\0" + prefix).join(names)]))
        if got == recorded:  # the common case: one list comparison
            return page
        others = []
        differ = list(map(operator.ne, got, recorded))  # C-level: a drifted page's 99 % that match are not looped over
        for name, length in zip(itertools.compress(names, differ), itertools.compress(got, differ), strict=True):
            page.codes[name] = WRONGTYPE if length < 0 else ABSENT if length == 0 else OTHER
            if length > 0:
                others.append(name)
        for batch in _batches(others, self._check_batch_size):  # forged (claims the hash) or another version
            args = [prefix, _joined(batch), "".join(page.hashes[n] for n in batch)]
            page.codes.update(zip(batch, await _call(self._claimed(keys=self._route, args=args)), strict=True))
        return page

    async def _sscan(self, key: str, cursor: int) -> tuple[int, list[str]]:
        try:
            found: tuple[int, list[str]] = await self.client.sscan(key, cursor, count=INDEX_PAGE)  # type: ignore[assignment]
        except redis.exceptions.ResponseError as e:
            if str(e).startswith("WRONGTYPE"):
                raise _WrongType from e
            raise
        return found

    async def read_manifest(self, paths: Sequence[str]) -> tuple[dict[str, keys.ManifestEntry], set[str]]:
        """The believable manifest entries of ``paths`` and the paths whose entry is present but malformed."""
        if not paths:
            return {}, set()
        if await _call(self.client.type(self.keyspace.manifest)) not in ("hash", "none"):
            return {}, set()
        values = await _call(self.client.hmget(self.keyspace.manifest, list(paths)))
        entries, malformed = {}, set()
        for path, value in zip(paths, values, strict=True):
            if value is None:
                continue
            entry = keys.parse_manifest(value)
            if entry is None:
                malformed.add(path)
            else:
                entries[path] = entry
        return entries, malformed

    async def read_index_members(self, paths: Sequence[str]) -> frozenset[str]:
        if not paths or await _call(self.client.type(self.keyspace.index)) != "set":
            return frozenset()
        flags = await _call(self.client.smismember(self.keyspace.index, list(paths)))
        return frozenset(p for p, member in zip(paths, flags, strict=True) if member)

    async def check_lengths(self, expected: Mapping[str, int | None]) -> dict[str, str]:
        """For each path, the status of its content key (``MATCH``/``OTHER``/``ABSENT``/``WRONGTYPE``, or
        ``PRESENT`` when no length was expected)."""
        result: dict[str, str] = {}
        for batch in _batches(list(expected.items()), self._check_batch_size):
            paths = [p for p, _ in batch]
            lengths = ",".join("" if n is None else str(n) for _, n in batch)
            codes = await _call(self._lengths(keys=self._route, args=[self.keyspace.prefix, _joined(paths), lengths]))
            result.update(zip(paths, codes, strict=True))
        return result

    async def check_values(self, expected: Mapping[str, tuple[str, str]]) -> dict[str, str]:
        """For each path, whether its content key holds exactly the value whose sha1 (hex) is given (with the
        module hash, to tell a forged value that claims it, ``CORRUPT``, from another version, ``OTHER``)."""
        result: dict[str, str] = {}
        for batch in _batches(list(expected.items()), self._deep_batch_size):
            paths = [p for p, _ in batch]
            sums, hashes = "".join(s for _, (s, _) in batch), "".join(h for _, (_, h) in batch)
            if len(sums) != 40 * len(batch) or len(hashes) != 64 * len(batch):
                raise errors.InputError(paths[0], "a digest is not a sha1/SHA-256 hex digest")
            args = [self.keyspace.prefix, _joined(paths), sums, hashes]
            codes = await _call(self._values(keys=self._route, args=args))
            result.update(zip(paths, codes, strict=True))
        return result

    async def check_claims(self, tails: Mapping[str, str]) -> dict[str, tuple[str, int]]:
        """For each path, whether its content key is a STRING ending in the given tail (``modules.cached_tail``: the
        path and module hash it claims), with its length when it is: ``MATCH`` here is a claim, not a verified
        value (see ``observation``: only a watcher, which checks every value right after, takes claims)."""
        result: dict[str, tuple[str, int]] = {}
        for batch in _batches(list(tails.items()), self._check_batch_size):
            paths = [p for p, _ in batch]
            args = [self.keyspace.prefix, _joined(paths), _joined([t for _, t in batch])]
            codes, lengths = await _call(self._claims(keys=self._route, args=args))
            for path, code, length in zip(paths, str(codes), str(lengths).split(","), strict=True):
                result[path] = (code, int(length) if length else 0)
        return result

    async def scan_names(self) -> set[str]:
        """Every path with a content key of this cache (SCAN, for keys nobody indexed); keys of a longer
        configured prefix and names that are not module paths are left out, so nothing can act on them."""
        found: set[str] = set()
        try:
            async for key in self.client.scan_iter(match=self.keyspace.scan_pattern, count=10_000):
                path = self.keyspace.path_of(str(key))
                if path is not None:
                    found.add(path)
        except (redis.exceptions.RedisError, OSError) as e:
            raise errors.CacheUnavailable(f"Redis failed: {errors.describe(e)}") from e
        return found

    # -- writing ----------------------------------------------------------------------------------------------

    async def apply(self, writes: Sequence[Write], *, fence: int, limit: int = 0) -> Applied:
        """Apply ``writes`` unless a newer write (manifest generation > ``fence``) got there first.

        ``limit`` is the highest believable generation (default: the server clock plus the slack)."""
        ks = self.keyspace
        for w in writes:  # an UNLIST name is only ever an index member / manifest field, never a key
            problem = ks.name_problem(w.item.path)
            if problem is not None and w.item.operation is not plan.Operation.UNLIST:
                raise errors.InputError(w.item.path, f"not a content key of this cache: {problem}")
        limit = limit or await self._limit()
        nonce = self._own_nonce()
        args: list[str | int] = [str(fence), self._ttl_s, self._ttl_jitter_s, random.randrange(1 << 30)]
        args += [nonce, ks.writes_channel, str(limit), ks.prefix, *_columns(writes)]
        args += [w.item.path for w in writes if w.item.operation is plan.Operation.UNLIST]
        args += [w.value for w in writes if w.item.operation is plan.Operation.PUT]
        try:
            written = [ks.generation, ks.index, ks.manifest, *ks.expected()]
            codes, repaired, gen = await _call(self._apply(keys=written, args=args))
        except BaseException:
            self.own_writes.pop(nonce, None)  # the iterator must not wait for an end marker that may never come
            if self.tracking_own_writes:
                self.aborted_writes.add(nonce)
            raise
        self.high_water = max(self.high_water, int(gen))
        return _applied(writes, str(codes), str(repaired), ks)

    def _marker(self) -> tuple[str, str]:
        """A nonce for a write of our own and the channel its markers go to."""
        return self._own_nonce(), self.keyspace.writes_channel

    async def _own(self, call: Awaitable[T], nonce: str) -> T:
        """Await a write bracketed by ``nonce``'s markers (forgotten if it fails: its end marker may never come)."""
        try:
            return await _call(call)
        except BaseException:
            self.own_writes.pop(nonce, None)
            if self.tracking_own_writes:
                self.aborted_writes.add(nonce)
            raise

    def _own_nonce(self) -> str:
        nonce = secrets.token_hex(8)
        self.writes_issued += 1
        if self.tracking_own_writes:
            self.own_writes[nonce] = self.writes_issued
            while len(self.own_writes) > MAX_OWN_WRITES:
                self.own_writes.popitem(last=False)
        return nonce

    async def _limit(self) -> int:
        seconds, micros = await _call(self.client.time())
        return int(seconds) * 1_000_000 + int(micros) + keys.GENERATION_SLACK_US

    async def refresh_ttl(self, paths: Iterable[str]) -> None:
        """Give existing content keys a fresh jittered TTL (no-op when no TTL is configured)."""
        if not self._ttl_s:
            return
        for batch in _batches(list(paths), self._check_batch_size):
            seed = random.randrange(1 << 30)
            nonce, channel = self._marker()
            args: list[str | int] = [self._ttl_s, self._ttl_jitter_s, seed, nonce, channel]
            await self._own(self._touch(keys=[self.keyspace.content(p) for p in batch], args=args), nonce)

    # -- members changed by someone else (the expected copies) ------------------------------------------------

    async def index_changes(self, *, removed: bool, added: bool) -> list[str] | None:
        """Index members someone else removed or added since the last look (``removed``/``added``: which to look
        for), by difference with the expected index; the copy then agrees with the index for them, so each change is
        reported once. None when the copy cannot be used (absent, wrong type) or more than ``MAX_CHANGED`` differ:
        a full resync is the repair then (and rebuilds it, ``settle_expected``)."""
        ks = self.keyspace
        nonce, channel = self._marker()
        which = ("-" if removed else "") + ("+" if added else "")
        reply = await self._own(
            self._index_changes(keys=[ks.index, ks.expected_index], args=[nonce, channel, which, MAX_CHANGED]), nonce
        )
        problem, *names = (str(x) for x in reply)
        return None if problem else names

    async def manifest_changes(self, *, dropped: bool, written: bool) -> list[str] | None:
        """Manifest fields someone else deleted (``dropped``) or wrote (``written``) since the last look, by
        comparison with the expected manifest, page by page; the copy then agrees for them. None as for
        ``index_changes``."""
        ks = self.keyspace
        found: list[str] = []
        for walk in ("f" if written else "") + ("r" if dropped else ""):
            cursor = "0"
            while True:
                nonce, channel = self._marker()
                args: list[str | int] = [nonce, channel, cursor, self._check_batch_size, walk]
                walked = [ks.manifest, ks.expected_manifest, ks.spare_manifest]
                reply = await self._own(self._manifest_changes(keys=walked, args=args), nonce)
                cursor, problem, *names = (str(x) for x in reply)
                if problem or len(found) + len(names) > MAX_CHANGED:
                    return None
                found += names
                if cursor == "0":
                    break
        return sorted(set(found))

    async def settle_expected(self, *, rebuild: bool = False) -> bool:
        """Make the expected copies agree with the index and the manifest if they cannot (absent, wrong type, another
        number of members; ``rebuild``: whatever they hold): before a full resync, which then repairs the originals
        and their copies alike. A copy whose original is gone is left as it is (unless ``rebuild``). The spare
        manifest is made again from the expected one when that was rebuilt or when their sizes differ. Whether a copy
        (not the spare) was rebuilt."""
        ks = self.keyspace
        nonce, channel = self._marker()
        originals = [ks.index, ks.manifest, *ks.expected()]
        how = "1" if rebuild else "0"
        return bool(await self._own(self._expected(keys=originals, args=[nonce, channel, how]), nonce))

    async def restore_from_copy(self, role: str) -> bool | None:
        """Put the expected copy of the index or the manifest (``role``) in its place: for a key someone else replaced
        as a whole. False (nothing done) when the copy is absent or of another type; None (nothing done) when the
        key looks intact (of its type, no TTL, as many members as the copy): a member check then tells."""
        ks = self.keyspace
        original, copy = {"index": (ks.index, ks.expected_index), "manifest": (ks.manifest, ks.expected_manifest)}[role]
        nonce, channel = self._marker()
        args = [nonce, channel, _WANTED_TYPES[role]]
        done = int(await self._own(self._from_copy(keys=[original, copy], args=args), nonce))
        return None if done == 2 else bool(done)

    async def put_manifest_back(self) -> bool:
        """Put the expected manifest in the manifest's place (``PUT_BACK``): for a manifest whose fields someone else
        changed. False (nothing done) when the copy is absent or has more than ``MAX_PUT_BACK`` entries."""
        ks = self.keyspace
        nonce, channel = self._marker()
        copies = [ks.manifest, ks.expected_manifest, ks.spare_manifest]
        put = self._put_back(keys=copies, args=[nonce, channel, MAX_PUT_BACK])
        done = int(await self._own(put, nonce))
        if done == 3:  # renamed: the copy is made again from the spare (the manifest is right already)
            nonce, channel = self._marker()
            await self._own(self._respare(keys=[ks.expected_manifest, ks.spare_manifest], args=[nonce, channel]), nonce)
        return done in (1, 3)

    # -- the sync status record ------------------------------------------------------------------------------

    async def write_status(self, status: keys.SyncStatus) -> None:
        """Replace the whole status hash (whatever else was in it, or whatever type it had, is gone)."""
        nonce, channel = self._marker()
        fields = [str(part) for pair in dict(status).items() for part in pair]
        await self._own(self._status(keys=[self.keyspace.status], args=[nonce, channel, *fields]), nonce)

    async def read_status(self) -> dict[str, str]:
        """The status hash as stored (empty if absent or not a hash)."""

        async def read() -> dict[str, str]:  # one call, not TYPE first: it is read twice per full resync
            try:
                raw = await self.client.hgetall(self.keyspace.status)
            except redis.exceptions.ResponseError as e:
                if str(e).startswith("WRONGTYPE"):
                    return {}
                raise
            return {str(k): str(v) for k, v in raw.items()}

        return await _call(read())

    async def status_problem(self) -> str | None:
        """Why the status hash is not a record modcache wrote, or None."""
        kind = str(await _call(self.client.type(self.keyspace.status)))
        if kind == "none":
            return None
        if kind != "hash":
            return f"wrong type: {kind}"
        fields = set(await _call(self.client.hkeys(self.keyspace.status)))
        return None if fields == set(keys.STATUS_FIELDS) else "fields are not modcache's"

    async def bookkeeping_missing(self, *, modules: int = 0) -> list[str]:
        """Which of the index, the manifest and their expected copies are absent or of another type, and (as
        ``content``) whether content keys are missing from a random sample of ``SAMPLE`` the expected index names:
        after a flush all are (a cache of no modules aside). The keys alone can be put back by whoever flushed
        (RESTORE of DUMPs: attack-9e E5), 10,000s of content keys not at once without being heard. The expected index
        counts as missing, too, when it names fewer than half of ``modules`` (the last full resync's count): after a
        flush, the repairs of the keys its round's events named make index, manifest and copies again, holding only
        those few, whose content keys are all there (a second flush within the rate limit's window then went unfilled
        for the rest of it: seed 9, round 125 of the chaos test)."""
        ks = self.keyspace
        wanted = {ks.index: "set", ks.manifest: "hash", ks.expected_index: "set", ks.expected_manifest: "hash"}
        *found, missing, size = await _call(self._bookkeeping(keys=list(wanted), args=[ks.prefix, SAMPLE]))
        gone = [key for (key, kind), got in zip(wanted.items(), found, strict=True) if str(got) != kind]
        if ks.expected_index not in gone and 2 * int(size) < modules:
            gone.append(ks.expected_index)
        return gone + (["content"] if int(missing) else [])

    async def key_type(self, key: str) -> str:
        """The type of one key under this cache's prefix ('none' when it does not exist)."""
        if not key.startswith(self.keyspace.prefix):
            raise errors.InputError(key, "not a key of this cache")
        return str(await _call(self.client.type(key)))

    async def read_module(self, path: str) -> str | None:
        """The raw JSON value of one content key (None if absent or not a string)."""
        key = self.keyspace.content(path)
        if await _call(self.client.type(key)) != "string":
            return None
        value = await _call(self.client.get(key))
        return value if value is None else str(value)


class _WrongType(Exception):
    """A key modcache reads page by page changed type between pages (or was of the wrong type)."""


def value_digest(value: str) -> str:
    """The sha1 (hex) ``VALUES`` compares a stored value with: of the bytes Redis holds for ``value``."""
    return hashlib.sha1(value.encode(), usedforsecurity=False).hexdigest()


def client_from_url(url: str, **options: Any) -> aioredis.Redis:
    """A client for ``url`` (ConfigError if it is not a Redis URL).

    Replies are decoded with ``surrogateescape``: names, members and values are binary-safe in Redis, and one that
    is not UTF-8 must become a name that ``keys.KeySpace.name_problem`` rejects (and that encodes back to the same
    bytes, so exactly it can be removed), never an exception out of the parser."""
    try:
        return aioredis.Redis.from_url(
            url, decode_responses=True, encoding_errors="surrogateescape", health_check_interval=30, **options
        )
    except ValueError as e:
        raise errors.ConfigError("redis_url", "not a valid Redis URL") from e


def _judged_page(fields: Mapping[str, str], limit: int) -> tuple[VerifiedPage, list[str], list[int]]:
    """A manifest page judged: the believable entries (path -> hash), the names that cannot be content keys (not
    ending in ``.py``, or holding a NUL), the malformed entries (not what ``keys.encode_manifest`` writes, or a
    generation above ``limit``); and the names whose length must be checked, with the lengths recorded."""
    names = list(fields)
    joined = "\0".join(names) + "\0"
    if joined.count("\0") == len(names) and joined.count(".py\0") == len(names):  # every name ends in .py, no NUL
        columns = keys.manifest_columns(list(fields.values()), limit=limit)
        if columns is not None:  # the common case: C-level operations only
            hashes, lengths, top = columns
            page = VerifiedPage(dict(zip(names, hashes, strict=True)), {}, [], [], top, names, hashes)
            return page, names, lengths  # ``names``: the fields of one dict, each once
    believed: dict[str, str] = {}
    not_paths, malformed, recorded, top = [], [], [], 0
    for name, value in fields.items():
        entry = keys.parse_manifest(value)
        if not name.endswith(".py") or "\0" in name:
            not_paths.append(name)
        elif entry is None or entry.generation > limit:
            malformed.append(name)
        else:
            believed[name] = entry.hash
            recorded.append(entry.length)
            top = max(top, entry.generation)
    judged = VerifiedPage(believed, {}, not_paths, malformed, top, list(believed), list(believed.values()))
    return judged, judged.names, recorded


def _discard(pending: asyncio.Future[Any] | None) -> None:
    """Cancel a read no longer wanted (its failure, if it failed, is not logged as lost: another one is raised)."""
    if pending is None:
        return
    pending.cancel()
    if pending.done() and not pending.cancelled():
        pending.exception()


def _joined(names: Sequence[str]) -> str:
    """``names`` as one NUL-separated argument (each must be a module path: none holds a NUL)."""
    joined = "\0".join(names)
    if names and joined.count("\0") != len(names) - 1:
        raise errors.InputError(next(n for n in names if "\0" in n), "a module path cannot hold a NUL")
    return joined


def _columns(writes: Sequence[Write]) -> tuple[str, str, str, str]:
    """APPLY's item columns: one op character each, 64 hash characters each (spaces for none), lengths by comma,
    paths by NUL (empty for UNLIST items, whose names go separately)."""
    hashes = [w.item.new or _NO_HASH for w in writes]
    for w, h in zip(writes, hashes, strict=True):  # hashes reaching a write were checked (SHA-256 hex)
        if len(h) != len(_NO_HASH):
            raise errors.InputError(w.item.path, "not a SHA-256 hex digest")
    ops = "".join(_OP_CODES[w.item.operation] for w in writes)
    unlist = plan.Operation.UNLIST
    paths = _joined(["" if w.item.operation is unlist else w.item.path for w in writes])
    return ops, "".join(hashes), ",".join(w.recorded_length() for w in writes), paths


def _applied(writes: Sequence[Write], codes: str, repaired: str, ks: keys.KeySpace) -> Applied:
    by_code: dict[str, list[plan.Item]] = {"a": [], "c": [], "m": []}
    for w, code in zip(writes, codes, strict=True):
        by_code[code].append(w.item)
    owned = ks.bookkeeping()
    repairs = [plan.KeyRepair(role, owned[role], "wrong type") for c, role in _APPLY_REPAIRS.items() if c in repaired]
    if "g" in repaired:
        repairs.append(plan.KeyRepair("generation", ks.generation, "missing or not believable"))
    if "l" in repaired:
        repairs.append(plan.KeyRepair("generation", ks.generation, "lower than the manifest"))
    return Applied(tuple(by_code["a"]), tuple(by_code["c"]), tuple(by_code["m"]), tuple(repairs))


def _batches(items: list[T], size: int) -> Iterable[list[T]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


#: A Cluster redirecting modcache's commands until redis-py gives up (``TTL exhausted``), or ``TRYAGAIN``: keys of the
#: cache's slot are split over two nodes, and its scripts (several keys at once) cannot run until they are together.
SLOT_MOVING = (
    "the Redis Cluster cannot run modcache's commands on the cache's {where}: its keys are being moved between "
    "nodes, by a resharding or one left half done ({error}). modcache retries by itself; if this lasts, look with "
    "'redis-cli --cluster check HOST:PORT' and finish or undo the migration with 'redis-cli --cluster fix HOST:PORT'"
)
CLUSTER_DOWN = (
    "the Redis Cluster is down (a slot has no reachable master); modcache retries by itself: see "
    "'redis-cli --cluster check HOST:PORT'"
)


async def _call(awaitable: Awaitable[T]) -> T:
    """Await a Redis call, translating redis-py's errors into CacheUnavailable."""
    try:
        result = await awaitable
    except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError, OSError) as e:
        raise errors.CacheUnavailable(f"Redis unreachable: {errors.describe(e)}") from e
    except redis.exceptions.ClusterDownError as e:
        raise errors.CacheUnavailable(f"{CLUSTER_DOWN} ({errors.describe(e)})") from e
    except (redis.exceptions.ClusterError, redis.exceptions.TryAgainError, redis.exceptions.AskError) as e:
        slot = getattr(e, "slot_id", None)  # an ASK or MOVED says which slot; redis-py's "TTL exhausted" does not
        where = f"hash slot {slot}" if slot is not None else "hash slot"
        raise errors.CacheUnavailable(SLOT_MOVING.format(where=where, error=errors.describe(e))) from e
    except redis.exceptions.RedisError as e:
        raise errors.CacheUnavailable(f"Redis error: {errors.describe(e)}") from e
    _raise_swallowed_cancel()
    return result


def _raise_swallowed_cancel() -> None:
    """Re-raise a cancellation that Python 3.11's ``asyncio.wait_for`` swallowed.

    redis-py sends every command through ``wait_for`` (``socket_timeout`` defaults to 5 s); before 3.12,
    ``wait_for`` returns the result instead of raising when the cancel arrives as the send completes
    (CPython gh-86296), and the cancelled task would carry on (a watcher that never stops).
    """
    task = asyncio.current_task()
    if sys.version_info < (3, 12) and task is not None and task.cancelling():
        raise asyncio.CancelledError
