"""Lighting-condition vocabulary shared by the renderer, the illumination ops and the evaluators.

One place names every condition so that a tag written by the synthetic world, by paper B's
illumination protocol (§4.2, "custom illumination dataset") or by paper A's simulate module means
the same thing in every per-condition table.

Fine conditions (what an image is tagged with) fold into four coarse groups, the classes of the
multi-class lighting classifier that paper A names as further work (normal / low / side / over),
and into the three buckets of paper B's protocol mix (~30% low-light, ~40% side-light,
~30% over-exposed/front-light).
"""

from __future__ import annotations

NORMAL = "normal"
LOW = "low"
SIDE_LEFT = "side_left"
SIDE_RIGHT = "side_right"
SIDE_TOP = "side_top"
SIDE_BOTTOM = "side_bottom"
OVER = "over"

#: Every fine-grained condition, in a fixed order (index = integer condition id).
CONDITIONS: tuple[str, ...] = (NORMAL, LOW, SIDE_LEFT, SIDE_RIGHT, SIDE_TOP, SIDE_BOTTOM, OVER)
SIDE_CONDITIONS: tuple[str, ...] = (SIDE_LEFT, SIDE_RIGHT, SIDE_TOP, SIDE_BOTTOM)

#: Coarse groups: the lighting classifier's classes.
GROUPS: tuple[str, ...] = ("normal", "low", "side", "over")

_GROUP_OF = {
    NORMAL: "normal",
    LOW: "low",
    SIDE_LEFT: "side",
    SIDE_RIGHT: "side",
    SIDE_TOP: "side",
    SIDE_BOTTOM: "side",
    OVER: "over",
}


def check(name: str) -> str:
    """Returns `name` if it is a known condition, else raises naming the valid choices."""
    if name not in _GROUP_OF:
        raise ValueError(f"unknown lighting condition {name!r}; valid: {', '.join(CONDITIONS)}")
    return name


def group(name: str) -> str:
    """Coarse group ('normal' | 'low' | 'side' | 'over') of a fine condition name."""
    return _GROUP_OF[check(name)]


def index(name: str) -> int:
    """Integer id of a fine condition (its position in CONDITIONS)."""
    return CONDITIONS.index(check(name))


def group_index(name: str) -> int:
    """Integer id of the coarse group of a fine condition (its position in GROUPS)."""
    return GROUPS.index(group(name))
