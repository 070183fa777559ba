"""What a data dir is: a primary's data (it takes writes) or a follower's copy of a primary,
recorded in DATA_DIR/role.json, so that a data dir is never started as the other by mistake. A
primary's datasets started with --follow would be replaced by copies of another index; a
follower's copy started without --follow would take writes its primary never sees, and the two
would part ways. `--promote` makes a follower's copy a primary on purpose (its primary is gone for
good; the other followers then follow it and copy it whole): only a complete copy, one whose
position is recorded, never one a whole copy was under way in. A data dir from before roles were
recorded is a follower's if it has a follower.json, else whatever this start makes it."""

import json
import logging

from convsearch.errors import FailedPrecondition
from convsearch_index import durable
from convsearch_index.engine import Index
from convsearch_index.follower import STATE_FILE, read_state

log = logging.getLogger("convsearch.index")
ROLE_FILE = "role.json"


def _recorded(index: Index) -> dict:
    path, state = index.data_dir / ROLE_FILE, index.data_dir / STATE_FILE
    if path.exists():
        try:
            recorded = json.loads(path.read_text())
        except ValueError as exc:
            raise FailedPrecondition(f"{path} is unreadable ({exc}); write {{\"role\": \"primary\"}} or "
                                     "{\"role\": \"follower\"} into it, whichever this data dir is") from None
        if not isinstance(recorded, dict) or recorded.get("role") not in ("primary", "follower"):
            raise FailedPrecondition(f"{path} names no role (primary or follower): {recorded!r}")
        return recorded
    if state.exists():  # a follower's, from before roles were recorded
        return {"role": "follower", "primary": ""}
    return {}


def claim_role(index: Index, follow: str, promote: bool = False) -> None:
    """Records the role this start gives the data dir; FAILED_PRECONDITION when it holds the other
    one's data (`promote`: a follower's copy becomes a primary)."""
    recorded = _recorded(index)
    datasets = index.records.dataset_names()
    if follow and recorded.get("role") == "primary" and datasets:
        raise FailedPrecondition(
            f"data dir {index.data_dir} holds the datasets of a primary index ({len(datasets)}); following {follow} "
            "would replace them with its copies. Give the follower an empty --data-dir, or start this one without "
            "--follow")
    if not follow and recorded.get("role") == "follower":
        primary = recorded.get("primary") or "its primary"
        if not promote:
            raise FailedPrecondition(
                f"data dir {index.data_dir} is a follower's copy of {primary}: started without --follow it would take "
                f"writes {primary} never sees. Start it with --follow {primary}, or with --promote to make it a "
                "primary for good (then point the followers at it)")
        state = read_state(index.data_dir / STATE_FILE)
        position = state.get("position")
        if state.get("copying"):
            raise FailedPrecondition(
                f"data dir {index.data_dir} holds an incomplete copy of dataset {state['copying']!r} (its copy from "
                f"{primary} was cut short): it cannot become a primary. Start it with --follow to copy again")
        if position is None:
            raise FailedPrecondition(
                f"data dir {index.data_dir} holds an incomplete copy of {primary} (a whole copy was under way, or its "
                "recorded position is unreadable): it cannot become a primary. Start it with --follow to copy again")
        (index.data_dir / STATE_FILE).unlink(missing_ok=True)
        log.warning("data dir %s, a follower's copy of %s at version %d, is promoted: it is a primary now",
                    index.data_dir, primary, position)
    role = {"role": "follower", "primary": follow} if follow else {"role": "primary"}
    if role != recorded:
        durable.write_file(index.data_dir / ROLE_FILE, json.dumps(role), index.fsync)
