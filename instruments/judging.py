"""Every accepted post judged for every listener across the room's histories: delivered,
signalled (covered by a `reset` or `missed` the listener was told), lost silently, or
duplicated. `make load CHAOS=...` (loadtests/faults.py) reports these figures.

A room's history can start again (a Redis restart without persistence, an eviction, an
expiry): its ids start again from 1, so an id alone does not name a post. Posts are keyed
by (room, history, id): the history is the server's `epoch` token where it gives one, and
otherwise found from the posts themselves (in order of their `ts`, a post whose id the
current history already holds begins a new one). What a listener received is matched to
the posts by (id, ts): a message with a reused id is never taken for the old one.

Plain data in, plain data out; tests/harness/test_chaos_judging.py holds it to made-up ledgers.

A listener's record (what loadtests/locustfile.py ships with --receipts):
  {"room", "segments": [{"epoch", "start", "from", "until", "got": [[id, ts]...],
                         "missed": [[when, since, count]...]}...], "stopped_at", ...}
A segment is its stay from one `reset` to the next (the first from its first answer):
`start` its cursor then, `from` when it began, `until` the time of the reset that ended it
(None for the last, which ends at `stopped_at`). A listener owes:
  - of the history its segment began in, every post after `start` accepted before the
    segment ended;
  - of every later history that began while the segment lasted (no reset between: the
    listener could not know), every post accepted before the segment ended.
A post it owes and did not receive is signalled when a reset or a `missed` covering it
reached the listener after the post was accepted, else lost silently. A reset ends the
segment: what the old history accepted after it is not owed.
"""

TS_MATCH = 1e-6       # seconds: a received message is an accepted post when id and ts agree


def split_histories(posts):
    """{room: [history]} of accepted posts [room, id, ts, epoch]; a history is
    {"key", "posts": {id: ts}, "first_ts", "last_ts"}, in order of their first post.

    With epochs, a history per (room, epoch). Without (epoch None), in ts order a post
    whose id the current history already holds begins the next one (ids are unique
    within one history; a room's history that starts again starts from 1)."""
    by_room = {}
    for post in posts:
        room, message_id, ts = post[0], post[1], post[2]
        epoch = post[3] if len(post) > 3 else None
        by_room.setdefault(room, []).append((ts, message_id, epoch))
    histories = {}
    for room, entries in by_room.items():
        entries.sort(key=lambda entry: (entry[0], entry[1]))
        kept, by_epoch, current = [], {}, None
        for ts, message_id, epoch in entries:
            if epoch is not None:
                history = by_epoch.get(epoch)
                if history is None:
                    history = by_epoch[epoch] = {"key": epoch, "posts": {}, "first_ts": ts, "last_ts": ts}
                    kept.append(history)
            else:
                if current is None or message_id in current["posts"]:
                    current = {"key": "#%d" % len(kept), "posts": {}, "first_ts": ts, "last_ts": ts}
                    kept.append(current)
                history = current
            history["posts"][message_id] = ts
            history["first_ts"] = min(history["first_ts"], ts)
            history["last_ts"] = max(history["last_ts"], ts)
        kept.sort(key=lambda history: history["first_ts"])
        histories[room] = kept
    return histories


def _history_of(segment, histories):
    """The index (in `histories`, one room's) of the history a segment began in, or None."""
    if segment.get("epoch") is not None:
        for index, history in enumerate(histories):
            if history["key"] == segment["epoch"]:
                return index
    for message_id, ts in segment.get("got", ())[:1]:
        for index, history in enumerate(histories):
            held = history["posts"].get(message_id)
            if held is not None and abs(held - ts) <= TS_MATCH:
                return index
    began = segment["from"]
    if segment["start"] > 0:
        # its cursor names a post of the history current when it began
        current = None
        for index, history in enumerate(histories):
            if history["first_ts"] <= began:
                current = index
        if current is not None:
            return current
        return 0 if histories else None
    # cursor 0: a history with nothing in it yet, the next one to begin
    for index, history in enumerate(histories):
        if history["last_ts"] >= began and all(ts >= began for ts in history["posts"].values()):
            return index
    return None


def judge_listener(listener, histories):
    """{"owed", "delivered", "signalled", "lost", "duplicated", "out_of_order", "unknown"}
    of one listener against its room's histories (split_histories' list for its room);
    "lost_posts" names (history key, id) of the first few lost silently."""
    counts = {"owed": 0, "delivered": 0, "signalled": 0, "lost": 0, "duplicated": 0, "out_of_order": 0,
              "unknown": 0, "lost_posts": []}
    segments = listener.get("segments") or []
    received = {}
    for segment in segments:
        previous = None
        for message_id, ts in segment.get("got", ()):
            key = (message_id, round(ts, 6))
            received[key] = received.get(key, 0) + 1
            if previous is not None and message_id <= previous:
                counts["out_of_order"] += 1
            previous = message_id
    for count in received.values():
        counts["duplicated"] += count - 1
    known = set()
    for history in histories:
        for message_id, ts in history["posts"].items():
            known.add((message_id, round(ts, 6)))
    counts["unknown"] = sum(1 for key in received if key not in known)  # an outcome the poster never learnt

    stopped = listener.get("stopped_at")
    for number, segment in enumerate(segments):
        first = _history_of(segment, histories)
        if first is None:
            continue
        end = segment.get("until")
        if end is None:
            end = stopped if stopped is not None else float("inf")
        # every reset and missed this listener was told from this segment on: [(when, since, count)]
        resets = [later["from"] for later in segments[number + 1:]]
        missed = [entry for later in segments[number:] for entry in later.get("missed", ())]
        for index in range(first, len(histories)):
            history = histories[index]
            if index > first and history["first_ts"] > end:
                break
            for message_id, ts in history["posts"].items():
                if ts > end or (index == first and message_id <= segment["start"]):
                    continue
                if index > first and ts < segment["from"]:
                    continue
                counts["owed"] += 1
                if (message_id, round(ts, 6)) in received:
                    counts["delivered"] += 1
                elif any(when >= ts for when in resets) or any(
                        when >= ts and since < message_id <= since + count for when, since, count in missed):
                    counts["signalled"] += 1
                else:
                    counts["lost"] += 1
                    if len(counts["lost_posts"]) < 5:
                        counts["lost_posts"].append([history["key"], message_id])
    return counts


def judge_run(listeners, posts):
    """Totals and per-listener figures of `listeners` (records with "segments") against
    the run's accepted `posts` [room, id, ts, epoch]: {"totals": {...}, "listeners": [...]}.
    Listeners without segments (gave up before their first answer, or vanished on
    purpose) are not judged."""
    histories = split_histories(posts)
    totals = {"listeners": 0, "owed": 0, "delivered": 0, "signalled": 0, "lost": 0, "duplicated": 0,
              "out_of_order": 0, "unknown": 0, "listeners_losing": 0, "listeners_signalled": 0,
              "histories": {room: len(kept) for room, kept in sorted(histories.items())}}
    per_listener = []
    for listener in listeners:
        if not listener.get("segments") or listener.get("vanished"):
            continue
        counts = judge_listener(listener, histories.get(listener["room"], []))
        totals["listeners"] += 1
        for name in ("owed", "delivered", "signalled", "lost", "duplicated", "out_of_order", "unknown"):
            totals[name] += counts[name]
        totals["listeners_losing"] += counts["lost"] > 0
        totals["listeners_signalled"] += counts["signalled"] > 0
        per_listener.append(dict(counts, listener=listener.get("listener"), room=listener["room"]))
    return {"totals": totals, "listeners": per_listener}


def first_served(posts, listeners, after):
    """The ts of the first post accepted after `after` that some listener of its room
    received (None when none was): where the time without service ends."""
    received = set()
    for listener in listeners:
        for segment in listener.get("segments") or ():
            for message_id, ts in segment.get("got", ()):
                received.add((listener["room"], message_id, round(ts, 6)))
    served = [post[2] for post in posts if post[2] > after and (post[0], post[1], round(post[2], 6)) in received]
    return min(served, default=None)
