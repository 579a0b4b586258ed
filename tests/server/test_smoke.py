"""A first pass over the protocol's happy path, in process and over a real socket."""

from harness.processes import get_json, post_json


def test_post_then_poll_in_process(wsgi):
    answer = wsgi("POST", "/rooms/abc/msgs", '{"from": "ann", "content": "hi"}',
                  {"Content-Type": "application/json"})
    assert answer.status == 201 and answer.json["id"] == 1
    answer = wsgi("GET", "/rooms/abc/msgs?since=0")
    assert answer.json["messages"][0]["content"] == "hi"
    assert answer.json["cursor"] == 1 and answer.json["missed"] == 0


def test_real_server_answers_health_and_post(start_chattle):
    server = start_chattle()
    status, health = get_json(server.url + "/health")
    assert (status, health) == (200, {"status": "ok", "bus": "memory", "pid": server.pid, "time": health["time"]})
    assert isinstance(health["time"], float)
    status, body = post_json(server.url + "/msgs", {"from": "ann", "content": "hello"})
    assert status == 201 and body["id"] == 1
