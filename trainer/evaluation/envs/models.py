"""MuJoCo models of the custom MT30 tasks, derived from dm_control's shipped XML.

The tasks and their arenas: docs/tdmpc2.md#custom-tasks.

Each function loads the standard suite XML, edits it with xml.etree and returns
`(xml_bytes, assets)`, ready for `Physics.from_xml_string(*model)`:

standard            -- a shipped suite model, unchanged
walker_long_floor   -- walker.xml with the floor half-length 500 (was 250), centre unchanged
cheetah_long_ground -- cheetah.xml with the ground half-length 200 (was 100), centre unchanged
reacher_three_links -- reacher.xml with the two-link arm replaced by a three-link arm
"""

from __future__ import annotations

import xml.etree.ElementTree as ET

from dm_control.suite import common

Model = tuple[bytes, dict[str, bytes]]


def standard(filename: str) -> Model:
    """A shipped dm_control suite model (e.g. "hopper.xml") as it is."""
    return common.read_model(filename), common.ASSETS


def _read(filename: str) -> ET.Element:
    return ET.fromstring(common.read_model(filename))


def _named(root: ET.Element, tag: str, name: str) -> ET.Element:
    element = root.find(f".//{tag}[@name='{name}']")
    if element is None:
        raise ValueError(f"no <{tag} name={name!r}> in {root.get('model')!r}: dm_control changed?")
    return element


def _model(root: ET.Element) -> Model:
    ET.indent(root)
    return ET.tostring(root), common.ASSETS


def _set_plane_half_length(filename: str, geom: str, half_length: float) -> Model:
    root = _read(filename)
    plane = _named(root, "geom", geom)
    size = plane.get("size", "").split()
    size[0] = f"{half_length:g}"
    plane.set("size", " ".join(size))
    return _model(root)


def walker_long_floor() -> Model:
    """The walker with room to travel far in -x (floor spans x in [-252, 748])."""
    return _set_plane_half_length("walker.xml", "floor", 500)


def cheetah_long_ground() -> Model:
    """The cheetah with room to travel far in -x (ground spans x in [-102, 298])."""
    return _set_plane_half_length("cheetah.xml", "ground", 200)


def _link(parent: ET.Element, name: str, pos: str, length: float, joint: dict) -> ET.Element:
    """A body with a capsule of `length` along +x and a hinge (axis, damping from defaults)."""
    body = ET.SubElement(parent, "body", name=name, pos=pos)
    ET.SubElement(
        body, "geom", name=name, type="capsule", fromto=f"0 0 0 {length:g} 0 0", size=".01",
        material="self",
    )  # fmt: skip
    ET.SubElement(body, "joint", joint)
    return body


def reacher_three_links() -> Model:
    """The 3-link reacher: arm0 (0.09, unlimited), arm1 (0.09, ±80°), hand (0.1 capsule, ±80°).

    The finger sphere sits 0.09 along the hand; three motors (gear 0.05, ctrl ±1) drive
    shoulder0, shoulder1 and wrist. Arena, target, timestep and disabled contacts are the
    standard reacher's.
    """
    root = _read("reacher.xml")
    root.set("model", "three-link planar reacher")
    worldbody = root.find("worldbody")
    old_arm = _named(root, "body", "arm")
    at = list(worldbody).index(old_arm)
    worldbody.remove(old_arm)

    limited = {"limited": "true", "range": "-80 80"}
    arm0 = _link(worldbody, "arm0", "0 0 .01", 0.09, {"name": "shoulder0"})
    arm1 = _link(arm0, "arm1", ".09 0 0", 0.09, {"name": "shoulder1", **limited})
    hand = _link(arm1, "hand", ".09 0 0", 0.1, {"name": "wrist", **limited})
    finger = ET.SubElement(hand, "body", name="finger", pos=".09 0 0")
    ET.SubElement(finger, "camera", name="hand", pos="0 0 .2", mode="track")
    ET.SubElement(finger, "geom", name="finger", type="sphere", size=".01", material="effector")
    worldbody.remove(arm0)
    worldbody.insert(at, arm0)  # the arm before the target, as in the standard file

    actuator = root.find("actuator")
    for motor in list(actuator):
        actuator.remove(motor)
    for joint in ("shoulder0", "shoulder1", "wrist"):
        ET.SubElement(actuator, "motor", name=joint, joint=joint, gear=".05", ctrlrange="-1 1")
    return _model(root)
