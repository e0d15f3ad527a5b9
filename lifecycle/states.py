"""The container state machine as a table, with Docker's words for the states and Docker's messages
for the refusals (moby `daemon/*.go`, see lifecycle-reference.md 1.2). Pure: the controller asks
`plan(verb, status)` before it touches anything, so a refused verb changes nothing.

    created --start--> running --pause--> paused --unpause--> running
    running/paused --stop|kill|exit--> exited --start--> running
    running --exit, restart policy--> restarting --backoff--> running
    created/exited --rm--> removing --> (gone);  running/paused --rm -f--> (killed) --> gone
    a removal that cannot finish --> dead (rm -f retries it)
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

__all__ = ["Status", "Verb", "Plan", "InvalidTransition", "plan", "TABLE"]


class Status(StrEnum):
    CREATED = "created"
    RUNNING = "running"
    PAUSED = "paused"
    RESTARTING = "restarting"
    REMOVING = "removing"
    EXITED = "exited"
    DEAD = "dead"


class Verb(StrEnum):
    START = "start"
    PAUSE = "pause"
    UNPAUSE = "unpause"
    STOP = "stop"
    KILL = "kill"
    RESTART = "restart"
    RM = "rm"
    RM_FORCE = "rm -f"


class InvalidTransition(Exception):
    """A verb the container's state does not allow; the message is Docker's."""


@dataclass(frozen=True)
class Plan:
    """What the controller does for a verb in a state. `noop` verbs succeed without acting
    (Docker answers 304 Not Modified to start-when-running and stop-when-stopped)."""

    action: str
    noop: bool = False


_S, _V = Status, Verb

# Messages use {id}; the controller formats them with the full id, as moby does.
NOT_RUNNING = "container {id} is not running"
ALREADY_PAUSED = "container {id} is already paused"
NOT_PAUSED = "Container {id} is not paused"
RESTARTING = "Container {id} is restarting, wait until the container is running"
START_PAUSED = "cannot start a paused container, try unpause instead"
MARKED_FOR_REMOVAL = "container is marked for removal and cannot be started"
RM_RUNNING = (
    'cannot remove container "/{name}": container is running: '
    "stop the container before removing or force remove"
)
RM_PAUSED = 'cannot remove container "/{name}": container is paused and must be unpaused first'
RM_IN_PROGRESS = "removal of container {id} is already in progress"
KILL_NOT_RUNNING = "Cannot kill container: {id}: container {id} is not running"

# (status, verb) -> Plan or the refusal message. Anything missing is a bug (tested: the table is
# total over Status x Verb).
TABLE: dict[tuple[Status, Verb], Plan | str] = {
    # created
    (_S.CREATED, _V.START): Plan("start"),
    (_S.CREATED, _V.PAUSE): NOT_RUNNING,
    (_S.CREATED, _V.UNPAUSE): NOT_PAUSED,
    (_S.CREATED, _V.STOP): Plan("none", noop=True),
    (_S.CREATED, _V.KILL): KILL_NOT_RUNNING,
    (_S.CREATED, _V.RESTART): Plan("start"),
    (_S.CREATED, _V.RM): Plan("remove"),
    (_S.CREATED, _V.RM_FORCE): Plan("remove"),
    # running
    (_S.RUNNING, _V.START): Plan("none", noop=True),
    (_S.RUNNING, _V.PAUSE): Plan("pause"),
    (_S.RUNNING, _V.UNPAUSE): NOT_PAUSED,
    (_S.RUNNING, _V.STOP): Plan("stop"),
    (_S.RUNNING, _V.KILL): Plan("kill"),
    (_S.RUNNING, _V.RESTART): Plan("stop+start"),
    (_S.RUNNING, _V.RM): RM_RUNNING,
    (_S.RUNNING, _V.RM_FORCE): Plan("kill+remove"),
    # paused: stop and kill deliver the signal and thaw (moby kill.go)
    (_S.PAUSED, _V.START): START_PAUSED,
    (_S.PAUSED, _V.PAUSE): ALREADY_PAUSED,
    (_S.PAUSED, _V.UNPAUSE): Plan("unpause"),
    (_S.PAUSED, _V.STOP): Plan("stop"),
    (_S.PAUSED, _V.KILL): Plan("kill"),
    (_S.PAUSED, _V.RESTART): Plan("stop+start"),
    (_S.PAUSED, _V.RM): RM_PAUSED,
    (_S.PAUSED, _V.RM_FORCE): Plan("kill+remove"),
    # restarting: waiting out the restart backoff, no process
    (_S.RESTARTING, _V.START): Plan("none", noop=True),
    (_S.RESTARTING, _V.PAUSE): RESTARTING,
    (_S.RESTARTING, _V.UNPAUSE): NOT_PAUSED,
    (_S.RESTARTING, _V.STOP): Plan("stop"),
    (_S.RESTARTING, _V.KILL): Plan("stop"),
    (_S.RESTARTING, _V.RESTART): Plan("stop+start"),
    (_S.RESTARTING, _V.RM): RM_RUNNING,
    (_S.RESTARTING, _V.RM_FORCE): Plan("kill+remove"),
    # exited
    (_S.EXITED, _V.START): Plan("start"),
    (_S.EXITED, _V.PAUSE): NOT_RUNNING,
    (_S.EXITED, _V.UNPAUSE): NOT_PAUSED,
    (_S.EXITED, _V.STOP): Plan("none", noop=True),
    (_S.EXITED, _V.KILL): KILL_NOT_RUNNING,
    (_S.EXITED, _V.RESTART): Plan("start"),
    (_S.EXITED, _V.RM): Plan("remove"),
    (_S.EXITED, _V.RM_FORCE): Plan("remove"),
    # removing: another rm is at work (or crashed: rm -f takes over after checking it is gone)
    (_S.REMOVING, _V.START): MARKED_FOR_REMOVAL,
    (_S.REMOVING, _V.PAUSE): NOT_RUNNING,
    (_S.REMOVING, _V.UNPAUSE): NOT_PAUSED,
    (_S.REMOVING, _V.STOP): Plan("none", noop=True),
    (_S.REMOVING, _V.KILL): KILL_NOT_RUNNING,
    (_S.REMOVING, _V.RESTART): MARKED_FOR_REMOVAL,
    (_S.REMOVING, _V.RM): RM_IN_PROGRESS,
    (_S.REMOVING, _V.RM_FORCE): Plan("remove"),
    # dead: a removal failed; only rm can finish it
    (_S.DEAD, _V.START): MARKED_FOR_REMOVAL,
    (_S.DEAD, _V.PAUSE): NOT_RUNNING,
    (_S.DEAD, _V.UNPAUSE): NOT_PAUSED,
    (_S.DEAD, _V.STOP): Plan("none", noop=True),
    (_S.DEAD, _V.KILL): KILL_NOT_RUNNING,
    (_S.DEAD, _V.RESTART): MARKED_FOR_REMOVAL,
    (_S.DEAD, _V.RM): Plan("remove"),
    (_S.DEAD, _V.RM_FORCE): Plan("remove"),
}


def plan(verb: Verb, status: Status, cid: str, name: str) -> Plan:
    """The plan for `verb` on a container in `status`, or InvalidTransition with Docker's words."""
    p = TABLE[(status, verb)]
    if isinstance(p, str):
        raise InvalidTransition(p.format(id=cid, name=name))
    return p


def is_active(status: Status) -> bool:
    """States in which a monitor (and, except while restarting, a mount) should exist."""
    return status in (Status.RUNNING, Status.PAUSED, Status.RESTARTING)
