import threading
import time

from cluster_agent.slots import JobSlots


def test_jobs_beyond_the_limit_wait_in_order_and_count_as_taken():
    slots = JobSlots(1)
    slots.enter("a")
    slots.wait_turn("a")
    order = []

    def run(job_id):
        slots.wait_turn(job_id)
        order.append(job_id)

    waiters = []
    for job_id in ("b", "c"):
        slots.enter(job_id)
        waiters.append(threading.Thread(target=run, args=(job_id,)))
        waiters[-1].start()
        time.sleep(0.05)
    assert slots.free() == 0 and order == []
    slots.release("a")
    time.sleep(0.05)
    assert order == ["b"]
    slots.release("b")
    for thread in waiters:
        thread.join(2)
    assert order == ["b", "c"] and slots.held() == 1


def test_adopted_jobs_take_their_slot_whatever_the_limit():
    slots = JobSlots(1)
    slots.enter("a", adopted=True)
    slots.enter("b", adopted=True)
    assert slots.held() == 2 and slots.free() == 0
    slots.release("a")
    assert slots.free() == 0  # still one over the limit's worth
    slots.release("b")
    assert slots.free() == 1


def test_a_waiting_job_that_is_released_gives_up_its_place():
    slots = JobSlots(1)
    slots.enter("a")
    slots.enter("b")
    slots.enter("c")
    slots.release("b")  # stopped while it waited
    slots.release("a")
    slots.wait_turn("c")
    assert slots.held() == 1 and slots.free() == 0
