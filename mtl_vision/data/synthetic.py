"""Procedural multi-task scenes, rendered on the fly by vectorised numpy ray casting.

Scene model: a pinhole camera sits at the world origin (world: x right, y up, z forward),
yawed by up to +-15 deg and pitched 4-15 deg down, with a horizontal field of view of 55-70 deg.
It looks into a box-shaped room: a floor 1.2-1.8 m below the camera, a ceiling, left/right
walls and a back wall 4-8 m away (ceiling and side walls are labelled "wall"). On the floor
stand 2-6 objects (oriented boxes, spheres, vertical capped cylinders) and, with probability
`figure_prob`, one jointed figure facing the camera, built of 13 ellipsoids grouped into the
six PASCAL-Part human-part groups and sized to cover roughly 35-65% of the image height.

Every label comes from the same nearest ray hit per pixel, so the tasks agree: class, instance
and part of the primitive hit, depth as z-depth along the optical axis in metres (like NYUD),
and the analytic surface normal. The image is a Lambertian rendering (one directional light +
ambient) of class-specific textures (checker floor, striped walls, planked boxes, smooth
spheres, striped cylinders, clothes/skin/hair on the figure) plus Gaussian noise.

Conventions: normals are unit vectors in the camera frame with x right, y up and z pointing
back towards the viewer (OpenGL style), so camera-facing surfaces have mostly positive z and a
horizontal flip negates x. Depth 0 and all-zero normals mark invalid geometry (sensor-like
holes, drawn with probability `invalid_prob`); holes leave the other labels untouched.
"""

from __future__ import annotations

import colorsys
import functools
import math
import zlib
from collections.abc import Callable, Mapping, Sequence
from types import MappingProxyType

import numpy as np
import torch
from torch.utils.data import Dataset

from mtl_vision.constants import IGNORE_INDEX
from mtl_vision.data.io import sample_index

CLASS_CATALOGUE = ("floor", "wall", "box", "sphere", "cylinder", "person")
PART_NAMES = ("background", "head", "torso", "upper_arms", "lower_arms", "upper_legs", "lower_legs")
TASK_NAMES = ("semseg", "depth", "normals", "edge", "saliency", "human_parts")
DEFAULT_NUM_SAMPLES: Mapping[str, int] = MappingProxyType({"train": 4000, "val": 256})
EDGE_DEPTH_JUMP = 0.05  # relative depth step between two primitives that counts as a boundary

_F32 = np.float32
_INF = np.float32(np.inf)
_OBJECT_SHAPES = ("box", "sphere", "cylinder")
_NOISE_BANK: np.ndarray | None = None


def _hsv(h: float, s: float, v: float) -> np.ndarray:
    return np.array(colorsys.hsv_to_rgb(h % 1.0, s, v))


def _rot_y(angle: float) -> np.ndarray:
    c, s = math.cos(angle), math.sin(angle)
    return np.array([[c, 0.0, s], [0.0, 1.0, 0.0], [-s, 0.0, c]])


@functools.lru_cache(maxsize=8)
def _pixel_grid(height: int, width: int) -> np.ndarray:
    """(3, H*W): pixel-centre offsets from the principal point (x right, y up) and a row of ones."""
    u = np.arange(width) + 0.5 - width / 2
    v = height / 2 - np.arange(height) - 0.5
    grid = np.stack([np.tile(u, height), np.repeat(v, width), np.ones(height * width)]).astype(_F32)
    grid.flags.writeable = False
    return grid


class _Renderer:
    """Rays of one camera, a z-buffer of nearest hits (depth, primitive id, world normal) and
    the primitive table (one dict per primitive: class, instance, part, colours, texture)."""

    def __init__(self, rng: np.random.Generator, height: int, width: int) -> None:
        self.h, self.w = height, width
        self.f = width / (2.0 * math.tan(math.radians(rng.uniform(55.0, 70.0)) / 2.0))
        self.yaw = rng.uniform(-0.26, 0.26)
        pitch = rng.uniform(0.07, 0.26)
        cp, sp = math.cos(pitch), math.sin(pitch)
        self.rot = _rot_y(self.yaw) @ np.array([[1.0, 0.0, 0.0], [0.0, cp, -sp], [0.0, sp, cp]])  # camera -> world
        # Ray directions have camera-frame z = 1, so the ray parameter t *is* the z-depth.
        to_rays = (self.rot * [1 / self.f, 1 / self.f, 1.0]).astype(_F32)
        self.d = (to_rays @ _pixel_grid(height, width)).reshape(3, height, width)
        self.depth = np.empty((height, width), dtype=_F32)
        self.prim = np.empty((height, width), dtype=np.intp)
        self.normal = np.empty((3, height, width), dtype=_F32)
        self.table: list[dict] = []

    def add(self, **row) -> int:  # -> primitive id
        self.table.append(row)
        return len(self.table) - 1

    def roi(self, centre: np.ndarray, radius: float) -> tuple[slice, slice] | None:
        """Screen rectangle holding the projection of a bounding sphere (None if off-screen)."""
        x, y, z = (centre @ self.rot).tolist()  # camera frame
        if z - radius < 0.05:
            return slice(0, self.h), slice(0, self.w)
        xs = [(x + a) / (z + b) for a in (-radius, radius) for b in (-radius, radius)]
        ys = [(y + a) / (z + b) for a in (-radius, radius) for b in (-radius, radius)]
        c0, c1 = max(math.floor(min(xs) * self.f + self.w / 2) - 1, 0), min(math.ceil(max(xs) * self.f + self.w / 2) + 1, self.w)
        r0, r1 = max(math.floor(self.h / 2 - max(ys) * self.f) - 1, 0), min(math.ceil(self.h / 2 - min(ys) * self.f) + 1, self.h)
        return (slice(r0, r1), slice(c0, c1)) if r1 > r0 and c1 > c0 else None

    def commit(self, roi: tuple[slice, slice], t: np.ndarray, n: np.ndarray, pid: int) -> None:
        """Z-buffer update: keep the hits that are nearer than what is there."""
        depth = self.depth[roi]
        closer = t < depth
        np.copyto(depth, t, where=closer)
        np.copyto(self.prim[roi], pid, where=closer)
        np.copyto(self.normal[(slice(None), *roi)], n, where=closer)

    def room(self, floor: float, ceiling: float, left: float, right: float, back: float) -> None:
        """The room box seen from inside, as primitives 0-4 (floor, ceiling, left, right, back):
        along each axis only one of the two planes faces a given ray."""
        dx, dy, dz = self.d
        up, rightwards = dy >= 0, dx >= 0
        ty = np.abs((floor + up * _F32(ceiling - floor)) / dy)  # abs: dy = -0.0 would give -inf
        tx = np.abs((left + rightwards * _F32(right - left)) / dx)
        tz = back / dz  # every ray looks forward: |yaw| + hfov/2 < 90 deg
        np.minimum(np.minimum(tx, ty), tz, out=self.depth)
        on_z, on_y = self.depth == tz, self.depth == ty
        on_y &= ~on_z
        on_x = ~(on_y | on_z)
        self.prim[:] = on_y * up.view(np.int8) + on_x * (2 + rightwards.view(np.int8)) + on_z * np.int8(4)
        inward = np.array([[0, 1, 0], [0, -1, 0], [1, 0, 0], [-1, 0, 0], [0, 0, -1]], dtype=_F32).T
        np.take(inward, self.prim, axis=1, out=self.normal)

    def box(self, roi, centre: np.ndarray, yaw: float, half: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Slab test in the box frame; the normal is the axis of the entry slab."""
        dx, dy, dz = d = self.d[(slice(None), *roi)]
        rot = _rot_y(yaw).astype(_F32)
        c, s = rot[0, 0], rot[0, 2]
        origin = rot.T @ (-centre)
        for i, dl in enumerate((c * dx - s * dz, dy, s * dx + c * dz)):
            ta, tb = (-half[i] - origin[i]) / dl, (half[i] - origin[i]) / dl
            lo, hi = np.minimum(ta, tb), np.maximum(ta, tb)
            if i == 0:
                t_near, t_far, face = lo, hi, np.zeros(lo.shape, dtype=np.intp)
            else:
                entered = lo > t_near
                np.copyto(t_near, lo, where=entered)
                np.copyto(face, i, where=entered)
                np.minimum(t_far, hi, out=t_far)
        t = np.where((t_near <= t_far) & (t_near > 0), t_near, _INF)
        n = np.take(rot, face, axis=1)
        return t, n * (_F32(1) - _F32(2) * (n[0] * d[0] + n[1] * d[1] + n[2] * d[2] > 0))  # face the camera

    def cylinder(self, roi, cx: float, cz: float, radius: float, y0: float, y1: float):
        """Vertical finite cylinder: side quadric in xz plus the two caps."""
        dx, dy, dz = self.d[(slice(None), *roi)]
        a = dx * dx + dz * dz
        b = dx * cx + dz * cz
        t = (b - np.sqrt(b * b - a * (cx * cx + cz * cz - radius * radius))) / a  # NaN: misses
        y = t * dy
        t = np.where((t > 0) & (y >= y0) & (y <= y1), t, _INF)
        side = np.ones(t.shape, dtype=bool)
        for cap in (y0, y1):
            tc = cap / dy
            hit = (tc > 0) & (tc < t) & ((tc * dx - cx) ** 2 + (tc * dz - cz) ** 2 <= radius * radius)
            np.copyto(t, tc, where=hit)
            side &= ~hit
        px, pz = t * dx - cx, t * dz - cz
        scale = side / np.maximum(np.sqrt(px * px + pz * pz), _F32(1e-12))  # renormalise: float32 hits are off the surface
        return t, np.stack([px * scale, np.sign(dy) * (side - _F32(1)), pz * scale])

    def ellipsoid(self, roi, centre: np.ndarray, quadric: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Ellipsoid (p-c)^T M (p-c) = 1 seen from outside; the normal is the gradient M (p-c)."""
        d = self.d[(slice(None), *roi)]
        shape = d.shape
        d = d.reshape(3, -1)
        md = quadric.astype(_F32) @ d
        mc = (quadric @ centre).astype(_F32)
        a = (d * md).sum(axis=0)
        b = mc @ d
        t = (b - np.sqrt(b * b - a * _F32(centre @ quadric @ centre - 1))) / a  # NaN: misses
        t = np.where(t > 0, t, _INF)
        n = md * t - mc[:, None]  # garbage where t is inf, but commit() never takes those
        return t.reshape(shape[1:]), (n / np.sqrt((n * n).sum(axis=0))).reshape(shape)


def _heading(rend: _Renderer, forward: float, lateral: float) -> tuple[float, float]:
    """World (x, z) of a point given in the camera's heading frame (yaw only)."""
    return tuple((_rot_y(rend.yaw) @ [lateral, 0.0, forward])[::2].tolist())


def _limb(abduct: float, flex: float, side: float) -> np.ndarray:
    """Unit direction of a limb hanging down, swung out by `abduct` and forward by `flex`."""
    return np.array([side * math.sin(abduct) * math.cos(flex), -math.cos(abduct) * math.cos(flex), math.sin(flex)])


def _build_figure(rng, rend: _Renderer, floor_y: float, room: dict):
    """Jointed figure of 13 ellipsoids with swinging arms and legs, facing the camera.

    Adds its table rows and may push the back wall behind it; returns its floor footprint
    (x, z, radius) and a callable that draws it once the room is in the z-buffer.
    """
    hgt, frac = rng.uniform(1.55, 1.85), rng.uniform(0.35, 0.65)
    forward = hgt * rend.f / (frac * rend.h)  # projected height ~ frac of the image height
    x, z = _heading(rend, forward, rng.uniform(-0.45, 0.45) * forward * rend.w / (2 * rend.f))
    x = min(max(x, room["left"] + 0.5), room["right"] - 0.5)
    room["back"] = max(room["back"], z + 1.0)
    segments = []  # (part id, start, end, radius / height, look), in the figure's frame
    swing = rng.uniform(-0.6, 0.6)
    for side in (-1.0, 1.0):
        abduct = rng.uniform(0.1, 0.7) if rng.random() < 0.8 else rng.uniform(0.7, 1.5)
        flex = side * swing + rng.uniform(-0.3, 0.3)
        shoulder = np.array([side * 0.165, 0.79, 0.0]) * hgt
        elbow = shoulder + 0.17 * hgt * _limb(abduct, flex, side)
        wrist = elbow + 0.21 * hgt * _limb(abduct, flex + rng.uniform(0.0, 1.4), side)
        hip = np.array([side * 0.065, 0.52, 0.0]) * hgt
        hip_flex, abd_leg = -side * swing * 0.7 + rng.uniform(-0.15, 0.15), rng.uniform(0.0, 0.15)
        knee = hip + 0.245 * hgt * _limb(abd_leg, hip_flex, side)
        ankle = knee + 0.245 * hgt * _limb(abd_leg, hip_flex - rng.uniform(0.0, 0.8), side)
        toe = ankle + np.array([0.0, -0.005, 0.11]) * hgt
        # Limbs are a bit thicker than human ones so that they stay several pixels wide.
        segments += [(3, shoulder, elbow, 0.048, "shirt"), (4, elbow, wrist, 0.04, "skin"), (5, hip, knee, 0.064, "pants"),
                     (6, knee, ankle, 0.052, "pants"), (6, ankle - [0.0, 0.0, 0.01 * hgt], toe, 0.035, "shoe")]
    start, end = np.array([s[1] for s in segments]), np.array([s[2] for s in segments])
    radius = np.array([s[3] for s in segments]) * hgt
    length = np.linalg.norm(end - start, axis=1)
    axis, half = (end - start) / length[:, None], length / 2 + 0.6 * radius  # overlap at the joints
    semi = np.array([[0.068, 0.08, 0.072], [0.125, 0.17, 0.08]]) * hgt  # head, torso
    quads = np.concatenate([np.eye(3) / semi[:, None, :] ** 2,  # limbs: 1/r^2 across, 1/half^2 along the bone
                            np.eye(3) / radius[:, None, None] ** 2
                            + (1 / half**2 - 1 / radius**2)[:, None, None] * axis[:, :, None] * axis[:, None, :]])
    centres = np.concatenate([[[0.0, 0.93 * hgt, 0.0], [0.0, 0.68 * hgt, 0.0]], (start + end) / 2])
    half_y = np.concatenate([semi[:, 1], np.sqrt(radius**2 + (half**2 - radius**2) * axis[:, 1] ** 2)])
    bounds = np.concatenate([semi.max(axis=1), half]).tolist()
    looks = [(1, "head"), (2, "shirt")] + [(s[0], s[4]) for s in segments]
    rot = _rot_y(rend.yaw + math.pi + rng.uniform(-0.5, 0.5))
    lowest = float((centres[:, 1] - half_y).min())  # stand the lowest point on the floor
    world_c = centres @ rot.T + np.array([x, floor_y - lowest, z])
    world_q = rot @ quads @ rot.T
    skin = _hsv(rng.uniform(0.03, 0.1), rng.uniform(0.3, 0.6), rng.uniform(0.45, 0.95))
    colours = {"shirt": _hsv(rng.random(), rng.uniform(0.3, 0.9), rng.uniform(0.35, 0.95)),
               "pants": _hsv(rng.random(), rng.uniform(0.2, 0.8), rng.uniform(0.2, 0.7)),
               "skin": skin, "head": skin, "shoe": _hsv(rng.random(), 0.3, rng.uniform(0.1, 0.3))}
    hair = _hsv(rng.uniform(0.02, 0.12), rng.uniform(0.3, 0.8), rng.uniform(0.05, 0.5))
    rois = [rend.roi(c, b) for c, b in zip(world_c, bounds)]
    ids = [rend.add(cls="person", inst=-1, part=part, kind=look, cols=(colours[look], hair), centre=world_c[i],
                    roi=rois[i], size=0.075 * hgt) for i, (part, look) in enumerate(looks)]

    def draw() -> None:
        for roi, centre, quadric, pid in zip(rois, world_c, world_q, ids):
            if roi is not None:  # one small screen rectangle per part keeps thin limbs cheap
                rend.commit(roi, *rend.ellipsoid(roi, centre, quadric), pid)

    return (x, z, 0.35), draw


def _build_objects(rng, rend: _Renderer, floor_y: float, room: dict, shapes: Sequence[str], taken: list) -> None:
    """2-6 objects resting on the floor, kept apart from each other and from the figure."""
    tan_half = rend.w / (2 * rend.f)
    for _ in range(int(rng.integers(2, 7)) if shapes else 0):
        shape = shapes[int(rng.integers(len(shapes)))]
        if shape == "box":
            half = rng.uniform(0.15, 0.5, size=3)
            foot, bound = math.hypot(half[0], half[2]), float(np.linalg.norm(half))
        elif shape == "sphere":
            radius = rng.uniform(0.15, 0.45)
            foot = bound = radius
        else:
            radius, height = rng.uniform(0.1, 0.35), rng.uniform(0.3, 1.2)
            foot, bound = radius, math.hypot(radius, height / 2)
        yaw, hue, sat, val, hue_b, scale = rng.random(6).tolist()
        for _ in range(8):  # rejection sampling for a free spot; skip the object if none
            forward = rng.uniform(1.4, room["back"] - 0.4)
            x, z = _heading(rend, forward, rng.uniform(-0.9, 0.9) * forward * tan_half)
            x, z = min(max(x, room["left"] + foot), room["right"] - foot), min(z, room["back"] - foot)
            if all(math.hypot(x - ox, z - oz) > foot + other for ox, oz, other in taken):
                break
        else:
            continue
        taken.append((x, z, foot))
        if shape == "box":  # woody hues with dark plank lines
            col = _hsv(0.03 + 0.1 * hue, 0.35 + 0.4 * sat, 0.4 + 0.45 * val)
            centre = np.array([x, floor_y + half[1], z])
            row = dict(cols=(col, col * 0.5), yaw=2 * math.pi * yaw, half=half, scale=0.08 + 0.1 * scale)
        elif shape == "sphere":  # saturated, untextured
            centre = np.array([x, floor_y + radius, z])
            row = dict(cols=(_hsv(hue, 0.55 + 0.45 * sat, 0.55 + 0.45 * val),))
        else:  # cool, greyish, with vertical stripes around the side
            centre = np.array([x, floor_y + height / 2, z])
            row = dict(cols=(_hsv(0.45 + 0.3 * hue, 0.15 + 0.45 * sat, 0.4 + 0.45 * val), _hsv(hue_b, 0.7, 0.9)),
                       scale=float(rng.integers(4, 11)))
        roi = rend.roi(centre, bound)
        pid = rend.add(cls=shape, inst=len(rend.table), part=0, kind=shape, centre=centre, roi=roi, **row)
        if roi is None:
            continue
        if shape == "box":
            t, n = rend.box(roi, centre, row["yaw"], half)
        elif shape == "sphere":
            t, n = rend.ellipsoid(roi, centre, np.eye(3) / radius**2)
        else:
            t, n = rend.cylinder(roi, x, z, radius, floor_y, floor_y + height)
        rend.commit(roi, t, n, pid)


def _render_scene(rng, height: int, width: int, classes: Sequence[str], figure_prob: float):
    """Sample and ray-cast one scene; returns the renderer (filled z-buffer) and whether it has a figure."""
    rend = _Renderer(rng, height, width)
    floor_y = -rng.uniform(1.2, 1.8)
    room = {"left": -rng.uniform(1.8, 3.5), "right": rng.uniform(1.8, 3.5), "back": rng.uniform(4.0, 8.0),
            "ceiling": rng.uniform(2.4, 3.0) + floor_y}
    floor = _hsv(rng.uniform(0.0, 0.15), rng.uniform(0.1, 0.6), rng.uniform(0.35, 0.75))
    wall = _hsv(rng.random(), rng.uniform(0.05, 0.3), rng.uniform(0.55, 0.95))
    floor_cols = (floor, floor * rng.uniform(0.45, 0.8), floor * 0.55)  # tiles, other tiles, grout
    wall_cols = (wall, wall * rng.uniform(0.7, 0.9))
    tile, stripe = rng.uniform(0.3, 0.8), rng.uniform(0.1, 0.4)
    for kind, cols, scale in (("floor", floor_cols, tile), ("ceiling", (np.minimum(wall * 1.1, 1),), 1.0),
                              ("wall_z", wall_cols, stripe), ("wall_z", wall_cols, stripe), ("wall_x", wall_cols, stripe)):
        rend.add(cls="floor" if kind == "floor" else "wall", inst=len(rend.table), part=0, kind=kind, cols=cols,
                 scale=scale, roi=None)
    has_figure = rng.random() < figure_prob and "person" in classes
    taken: list = []
    if has_figure:  # before the room is drawn: it may push the back wall
        footprint, draw_figure = _build_figure(rng, rend, floor_y, room)
        taken.append(footprint)
    rend.room(floor_y, room["ceiling"], room["left"], room["right"], room["back"])
    if has_figure:
        draw_figure()
    _build_objects(rng, rend, floor_y, room, [c for c in _OBJECT_SHAPES if c in classes], taken)
    return rend, has_figure


def _noise(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """Standard normal noise cut at a random offset from a fixed seeded bank: fresh draws would
    cost as much as the rendering, and the bank keeps samples deterministic."""
    global _NOISE_BANK
    if _NOISE_BANK is None:
        bank = np.random.default_rng(0x5EED).standard_normal(1 << 21, dtype=_F32)
        bank.flags.writeable = False  # callers get views of it
        _NOISE_BANK = bank
    size = math.prod(shape)
    if 2 * size > len(_NOISE_BANK):
        return rng.standard_normal(shape, dtype=_F32)
    start = int(rng.integers(0, len(_NOISE_BANK) - size))
    return _NOISE_BANK[start:start + size].reshape(shape)


def _shade(rng, rend: _Renderer) -> np.ndarray:
    """Lambertian image of the textured albedo: one directional light + ambient + noise.

    Textures pick one of up to three colours per primitive (`level` 0/1/2), so the albedo is
    a single table lookup.
    """
    tab, prim = rend.table, rend.prim
    p = rend.depth * rend.d  # world hit points (the camera is at the origin)
    kinds = [r["kind"] for r in tab]
    code = np.take(np.array([{"floor": 1, "wall_x": 2, "wall_z": 3}.get(k, 0) for k in kinds], dtype=np.int8), prim)
    scale = np.take(np.array([r.get("scale", 1.0) for r in tab], dtype=_F32), prim)
    fx, fz = p[0] / scale, p[2] / scale
    ix, iz = np.floor(fx), np.floor(fz)
    fx -= ix  # position inside the tile / stripe
    fz -= iz
    checker = (ix + iz).astype(np.int32) & 1
    grout = (fx < 0.05) | (fz < 0.05)
    stripes = (fz + (code == 2) * (fx - fz)) < 0.5
    level = (code == 1) * (checker + grout * (2 - checker)) + (code > 1) * stripes
    for pid, (row, kind) in enumerate(zip(tab, kinds)):
        if kind not in ("box", "cylinder", "head") or row["roi"] is None:
            continue
        roi = row["roi"]
        mask = prim[roi] == pid
        if not mask.any():
            continue
        q = p[(slice(None), *roi)][:, mask] - row["centre"][:, None].astype(_F32)
        if kind == "box":  # plank lines along local y, a darker frame along the box edges
            ql = _rot_y(row["yaw"]).T.astype(_F32) @ q
            planks = np.fmod(ql[1] + row["half"][1], row["scale"]) < 0.012
            level[roi][mask] = planks | ((np.abs(ql) > 0.88 * row["half"][:, None]).sum(axis=0) >= 2)
        elif kind == "cylinder":
            level[roi][mask] = np.fmod(np.arctan2(q[2], q[0]) * (row["scale"] / (2 * math.pi)) + 100, 1) < 0.5
        else:  # hair on top of the head
            level[roi][mask] = q[1] > 0.35 * row["size"]
    tint = 1 + rng.uniform(-0.08, 0.08, size=(3, 1))
    cols = [[r["cols"][min(i, len(r["cols"]) - 1)] for r in tab] for i in range(3)]
    albedo = np.take((np.concatenate(cols).T * tint).astype(_F32), prim + len(tab) * level, axis=1)
    light = np.array([rng.uniform(-1, 1), rng.uniform(0.5, 1.5), -rng.uniform(0.2, 1.0)])
    light = (light / np.linalg.norm(light)).astype(_F32)
    ambient, diffuse = _F32(rng.uniform(0.15, 0.35)), _F32(rng.uniform(0.6, 0.85))
    n = rend.normal
    shade = np.maximum(light[0] * n[0] + light[1] * n[1] + light[2] * n[2], 0) * diffuse + ambient
    image = _noise(rng, albedo.shape) * _F32(rng.uniform(0.005, 0.02))
    image += albedo * shade
    return np.clip(image, 0, 1, out=image)


def _boundaries(inst: np.ndarray, prim: np.ndarray, depth: np.ndarray) -> np.ndarray:
    """Both pixels of every 4-neighbour pair across an instance change or a depth jump."""
    edge = np.zeros(inst.shape, dtype=bool)
    for a, b in (((slice(None, -1), slice(None)), (slice(1, None), slice(None))),
                 ((slice(None), slice(None, -1)), (slice(None), slice(1, None)))):
        da, db = depth[a], depth[b]
        # Instances never straddle classes, so they cover class changes; depth jumps count only
        # between different primitives (a grazing floor is smooth, an arm over the torso is not).
        diff = (inst[a] != inst[b]) | ((prim[a] != prim[b]) & (np.abs(da - db) > EDGE_DEPTH_JUMP * np.minimum(da, db)))
        edge[a] |= diff
        edge[b] |= diff
    return edge


def _holes(rng, height: int, width: int, depth: np.ndarray, invalid_prob: float) -> np.ndarray:
    """Sensor-like validity mask: a few rectangles/ellipses, sometimes a maximum range."""
    valid = np.ones((height, width), dtype=bool)
    if rng.random() >= invalid_prob:
        return valid
    for _ in range(int(rng.integers(1, 5))):
        bh, bw = int(rng.uniform(0.04, 0.2) * height) + 2, int(rng.uniform(0.04, 0.2) * width) + 2
        r0, c0 = int(rng.integers(0, height - bh + 1)), int(rng.integers(0, width - bw + 1))
        if rng.random() < 0.5:
            valid[r0:r0 + bh, c0:c0 + bw] = False
        else:
            yy, xx = np.ogrid[-1:1:bh * 1j, -1:1:bw * 1j]
            valid[r0:r0 + bh, c0:c0 + bw] &= yy * yy + xx * xx > 1
    if rng.random() < 0.5:
        valid &= depth < rng.uniform(4.5, 8.0)
    return valid


class SyntheticScenes(Dataset):
    """Deterministic on-the-fly synthetic scenes with six mutually consistent dense tasks.

    Sample `i` of a split depends only on (seed, split, i), so it is identical in every
    process, worker and access order. Targets follow the project's task-dict contract.
    """

    def __init__(self, *, split: str, tasks: Sequence[str], height: int = 128, width: int = 160,
                 classes: Sequence[str] = CLASS_CATALOGUE, num_samples: Mapping[str, int] | int = DEFAULT_NUM_SAMPLES,
                 seed: int = 0, figure_prob: float = 0.8, invalid_prob: float = 0.3,
                 transform: Callable[[dict], dict] | None = None) -> None:
        tasks, classes = list(tasks), list(classes)
        for arg, names, valid in (("tasks", tasks, TASK_NAMES), ("classes", classes, CLASS_CATALOGUE)):
            unknown = [name for name in names if name not in valid]
            if unknown or not names or len(set(names)) != len(names):
                raise ValueError(f"{arg}: expected distinct names from {valid}, got {names} (unknown: {unknown})")
        if "floor" not in classes or "wall" not in classes:
            raise ValueError(f"classes: expected 'floor' and 'wall' among them, got {classes}")
        if not isinstance(num_samples, int) and split not in num_samples:
            raise ValueError(f"num_samples: no count for split {split!r}, got splits {sorted(num_samples)}")
        count = num_samples if isinstance(num_samples, int) else int(num_samples[split])
        for arg, value, ok, expected in (("num_samples", count, count >= 0, "a count >= 0"),
                                         ("height", height, height >= 16, ">= 16 pixels"), ("width", width, width >= 16, ">= 16 pixels"),
                                         ("seed", seed, seed >= 0, "a non-negative integer"),
                                         ("figure_prob", figure_prob, 0 <= figure_prob <= 1, "a probability in [0, 1]"),
                                         ("invalid_prob", invalid_prob, 0 <= invalid_prob <= 1, "a probability in [0, 1]")):
            if not ok:
                raise ValueError(f"{arg}: expected {expected}, got {value!r}")
        self.split, self.tasks, self.classes = split, tasks, classes
        self.height, self.width, self.seed = height, width, seed
        self.figure_prob, self.invalid_prob = figure_prob, invalid_prob
        self.transform = transform
        self._count, self._split_key = count, zlib.crc32(split.encode("utf-8"))
        names = {"semseg": list(classes), "human_parts": list(PART_NAMES)}
        self.class_names: dict[str, list[str]] = {task: names[task] for task in tasks if task in names}

    def __len__(self) -> int:
        return self._count

    def __getitem__(self, index: int) -> dict:
        index = sample_index(index, self._count, self.split)
        rng = np.random.default_rng([self.seed, self._split_key, index])
        with np.errstate(divide="ignore", invalid="ignore"):  # rays parallel to a plane or missing a quadric
            rend, has_figure = _render_scene(rng, self.height, self.width, self.classes, self.figure_prob)
            image = _shade(rng, rend)
        valid = _holes(rng, self.height, self.width, rend.depth, self.invalid_prob)
        tab, prim, want = rend.table, rend.prim, set(self.tasks)

        def lookup(values, dtype=np.int64) -> np.ndarray:  # per-primitive values -> per-pixel map
            return np.take(np.array(values, dtype=dtype), prim)

        out: dict = {"image": torch.from_numpy(image)}
        if "semseg" in want:
            out["semseg"] = torch.from_numpy(lookup([self.classes.index(r["cls"]) for r in tab]))
        if "depth" in want:
            out["depth"] = torch.from_numpy((rend.depth * valid)[None])
        if "normals" in want:
            to_camera = (rend.rot.T * [[1], [1], [-1]]).astype(_F32)  # output z points at the viewer
            normals = (to_camera @ rend.normal.reshape(3, -1)).reshape(3, self.height, self.width)
            out["normals"] = torch.from_numpy(normals * valid)
        if "edge" in want:
            edge = _boundaries(lookup([r["inst"] for r in tab]), prim, rend.depth)
            out["edge"] = torch.from_numpy(edge[None].astype(_F32))
        if "saliency" in want:
            out["saliency"] = torch.from_numpy(lookup([r["cls"] not in ("floor", "wall") for r in tab], _F32)[None])
        if "human_parts" in want:
            parts = lookup([r["part"] for r in tab]) if has_figure else np.full(prim.shape, IGNORE_INDEX, dtype=np.int64)
            out["human_parts"] = torch.from_numpy(parts)
        out["meta"] = {"index": index, "name": f"{self.split}_{index:06d}", "size": torch.tensor([self.height, self.width])}
        return self.transform(out) if self.transform is not None else out
