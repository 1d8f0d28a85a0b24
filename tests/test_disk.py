from cluster_agent.disk import GIB, DiskGuard


class FakeApi:
    def __init__(self, images, containers=()):
        self.images = dict(images)  # name -> id
        self.used = set(containers)
        self.removed = []

    def containers(self, all=True):
        return [{"ImageID": image_id} for image_id in self.used]

    def inspect_image(self, name):
        return {"Id": self.images[name]}

    def remove_image(self, name):
        self.removed.append(name)
        del self.images[name]


def guard(tmp_path, free_gb, api, min_gb=5, prune_to=0):
    free = {"value": free_gb}
    g = DiskGuard(tmp_path, None, min_free_gb=min_gb, prune_to_free_gb=prune_to, engine_api=api,
                  free=lambda path: int(free["value"] * GIB), clock=iter(range(100)).__next__)
    return g, free


def test_low_disk_is_reported_with_the_cause(tmp_path):
    g, _ = guard(tmp_path, 2, FakeApi({}))
    state = g.check()
    assert state.low and "2.0 GiB free, under --min-free-disk-gb 5" in state.reason
    assert g.state.to_wire()["low"] is True


def test_enough_space_is_not_low(tmp_path):
    g, _ = guard(tmp_path, 50, FakeApi({}))
    assert g.check().low is False


def test_prune_removes_least_recently_used_unused_images_until_the_watermark(tmp_path):
    api = FakeApi({"old": "sha-old", "busy": "sha-busy", "mid": "sha-mid", "new": "sha-new"}, containers=["sha-busy"])
    g, free = guard(tmp_path, 1, api, prune_to=10)
    for image in ("old", "busy", "mid", "new"):  # used in this order
        g.image_used(image)
    original_remove = api.remove_image

    def remove(name):
        original_remove(name)
        free["value"] += 5  # each removal frees 5 GiB

    api.remove_image = remove
    removed = g.prune(10)
    assert removed == ["old", "mid"]  # "busy" is used by a container; after two, 11 GiB are free
    assert "new" in api.images and "busy" in api.images


def test_only_images_jobs_used_are_ever_pruned(tmp_path):
    api = FakeApi({"someone-elses": "sha-x"})
    g, _ = guard(tmp_path, 1, api, prune_to=10)
    assert g.prune(10) == []
    assert api.removed == []


def test_check_prunes_when_low_and_pruning_is_on(tmp_path):
    api = FakeApi({"old": "sha-old"})
    g, free = guard(tmp_path, 1, api, prune_to=10)
    g.image_used("old")
    original = api.remove_image
    api.remove_image = lambda name: (original(name), free.__setitem__("value", 20))
    assert g.check().low is False
    assert api.removed == ["old"]


def test_an_engine_data_root_out_of_sight_is_named_with_the_mount_that_shows_it(tmp_path, caplog):
    caplog.set_level("INFO", logger="cluster_agent.disk")
    DiskGuard(tmp_path, tmp_path / "var-lib-docker", min_free_gb=5, prune_to_free_gb=0, engine_api=FakeApi({}))
    root = tmp_path / "var-lib-docker"
    assert f"only the jobs directory's free space is checked (in a container, add -v {root}:{root}:ro" in caplog.text
