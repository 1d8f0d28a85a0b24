"""Job images: parallel jobs share one pull; jobs on a present image never wait for each other."""

import threading
import time

import pytest
from docker.errors import ImageNotFound

from cluster_agent.clock import SYSTEM_CLOCK
from cluster_agent.errors import JobFailed
from cluster_agent.executors.docker.images import ImagePuller


class FakeApi:
    """An engine whose pulls take `pull_seconds`; counts pulls and inspections per image."""

    def __init__(self, present=(), pull_seconds=0.2, fail=False):
        self.present = set(present)
        self.pulls: list[str] = []
        self.pull_seconds = pull_seconds
        self.fail = fail
        self.lock = threading.Lock()
        self.pulling = 0
        self.most_at_once = 0

    def inspect_image(self, image):
        with self.lock:
            if image not in self.present:
                raise ImageNotFound(f"no such image: {image}")
        return {"Id": "sha256:x"}

    def pull(self, repository, tag, stream, decode, auth_config):
        with self.lock:
            self.pulls.append(f"{repository}:{tag}")
            self.pulling += 1
            self.most_at_once = max(self.most_at_once, self.pulling)
        time.sleep(self.pull_seconds)
        with self.lock:
            self.pulling -= 1
        if self.fail:
            yield {"error": "manifest unknown"}
            return
        with self.lock:
            self.present.add(f"{repository}:{tag}")
        yield {"status": "Pull complete", "id": "layer1"}


def _puller(api):
    return ImagePuller(api, clock=SYSTEM_CLOCK, pull_timeout=30, pull_stall_seconds=10)


def _in_parallel(puller, images, policy="if-not-present"):
    errors = []

    def prepare(image):
        try:
            puller.prepare(image, policy)
        except JobFailed as exc:
            errors.append(str(exc))

    threads = [threading.Thread(target=prepare, args=(image,)) for image in images]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    return errors


def test_parallel_jobs_on_a_missing_image_pull_it_once():
    api = FakeApi()
    assert _in_parallel(_puller(api), ["reg.example/x:1"] * 6) == []
    assert api.pulls == ["reg.example/x:1"]


def test_different_images_are_pulled_side_by_side():
    api = FakeApi(pull_seconds=0.5)
    assert _in_parallel(_puller(api), ["reg.example/a:1", "reg.example/b:1", "reg.example/c:1"]) == []
    assert sorted(api.pulls) == ["reg.example/a:1", "reg.example/b:1", "reg.example/c:1"]
    assert api.most_at_once >= 2  # not one after another


def test_always_shares_a_pull_that_began_after_the_job_asked():
    api = FakeApi(present={"reg.example/x:1"})
    assert _in_parallel(_puller(api), ["reg.example/x:1"] * 4, policy="always") == []
    assert 1 <= len(api.pulls) <= 2  # the first pull began before the others asked: at most one more
    puller = _puller(api)
    puller.prepare("reg.example/x:1", "always")
    puller.prepare("reg.example/x:1", "always")
    assert len(api.pulls) >= 3  # one after another, each job gets its own fresh pull


def test_a_failed_pull_serves_nobody_and_every_job_says_why():
    api = FakeApi(fail=True)
    errors = _in_parallel(_puller(api), ["reg.example/x:1"] * 3)
    assert len(errors) == 3 and all("manifest unknown" in e and "--pull-policy never" in e for e in errors)


def test_never_refuses_a_missing_image_without_pulling():
    api = FakeApi()
    with pytest.raises(JobFailed, match="--pull-policy is never"):
        _puller(api).prepare("reg.example/x:1", "never")
    assert api.pulls == []


def test_an_image_found_present_is_not_asked_for_again_until_forgotten():
    api = FakeApi(present={"reg.example/x:1"})
    inspections = []
    real = api.inspect_image
    api.inspect_image = lambda image: (inspections.append(image), real(image))[1]
    puller = _puller(api)
    puller.prepare("reg.example/x:1")
    puller.prepare("reg.example/x:1")
    assert inspections == ["reg.example/x:1"]  # one engine round trip, not one per job
    assert puller.assumed_present("reg.example/x:1")
    puller.forget("reg.example/x:1")  # the executor's create found it gone
    api.present.clear()
    puller.prepare("reg.example/x:1")
    assert api.pulls == ["reg.example/x:1"]
