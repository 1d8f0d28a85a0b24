import json

from cluster_agent.json_depth import TOO_DEEP, cut_deep, holds_too_deep


def test_only_the_too_deep_part_is_replaced():
    deep = "[" * 1500 + "]" * 1500
    text = '{"jobs": [{"job_id": "good", "s": "[[[\\"]]]"}, {"job_id": "bad", "input_payload": ' + deep + "}]}"
    data = json.loads(cut_deep(text.encode(), 50))
    good, bad = data["jobs"]
    assert good == {"job_id": "good", "s": '[[["]]]'} and not holds_too_deep(good)
    assert bad["job_id"] == "bad" and holds_too_deep(bad)
    assert json.dumps(bad).count(json.dumps(TOO_DEEP)) == 1


def test_text_within_the_depth_is_unchanged():
    text = b'{"a": [1, {"b": "}{][\\\\"}], "c": []}'
    assert cut_deep(text, 10) == text
