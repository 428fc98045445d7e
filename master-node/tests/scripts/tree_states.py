"""State transitions on a tree of instances, with the unmodified slapos.core
client library, as `slapos request` and a root instance's buildout make them.

Usage: tree_states.py MASTER_URL SOFTWARE_RELEASE COMPUTER_ID

Prints one line per step ("ok STEP: ...") and exits non-zero at the first
step the client raises on or whose answer is wrong.
"""

import sys

import slapos.slap

master_url, sr, computer_id = sys.argv[1:4]
slap = slapos.slap.slap()
slap.initializeConnection(master_url)
order = slap.registerOpenOrder()


def step(name, call, want_state=None):
    try:
        answer = call()
    except Exception as e:  # the client's exceptions are what a user sees
        print(f"FAIL {name}: {type(e).__name__}: {e}")
        sys.exit(1)
    state = answer.getState() if answer is not None else None
    if want_state is not None and state != want_state:
        print(f"FAIL {name}: state {state!r}, expected {want_state!r}")
        sys.exit(1)
    print(f"ok {name}: state {state}")
    return answer


root = step(
    "request the root",
    lambda: order.request(sr, "blog", partition_parameter_kw={"title": "My blog"}, software_type="default"),
    "started",
)
partition = slap.registerComputerPartition(computer_id, root.getId())
step("publish the root's connection parameters",
     lambda: partition.setConnectionDict({"url": "http://[fd00::1]:8080"}) or root)
child = step(
    "the root requests a child",
    lambda: partition.request(sr, "default", "blog-db", partition_parameter_kw={"size": "1"}),
    "started",
)
step(
    "request a shared instance",
    lambda: order.request(sr, "blog-front", partition_parameter_kw={"domain": "blog.example"},
                          software_type="default", shared=True),
)
step("stop the root (no parameters)", lambda: order.request(sr, "blog", state="stopped"), "stopped")
step("start it again", lambda: order.request(sr, "blog", state="started"), "started")
step("stop it again", lambda: order.request(sr, "blog", state="stopped"), "stopped")
step("the root destroys its child alone",
     lambda: partition.request(sr, "default", "blog-db", state="destroyed"), "destroyed")
step("destroy the tree (no parameters)", lambda: order.request(sr, "blog", state="destroyed"), "destroyed")
step("destroy it twice", lambda: order.request(sr, "blog", state="destroyed"), "destroyed")
step("the node reports the root's partition wiped", lambda: partition.destroyed() or root)
step("destroy it once it is gone", lambda: order.request(sr, "blog", state="destroyed"), "destroyed")
step("destroy a title never requested", lambda: order.request(sr, "never-requested", state="destroyed"),
     "destroyed")
step("destroy the shared instance", lambda: order.request(sr, "blog-front", shared=True, state="destroyed"),
     "destroyed")
print("all steps passed")
