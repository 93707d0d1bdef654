"""Procedural street-scene layouts for the synthetic dataset: a label map plus the instances that colour it.

One generator serves both domains (only synthetic.py's style differs). A scene is drawn back to front on a
`Canvas`: sky, buildings with windows, trees, the ground (road towards a vanishing point, sidewalks), then objects
far to near, growing below the horizon. Every region is an instance with its own base colour (sRGB 0..1). Classes
are Cityscapes label ids; the rare ones (rider, bus, train, motorcycle, bicycle) appear in about 5-15% of the
scenes each, small, to exercise the long-tail paste.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

# Cityscapes label ids used by the scenes.
UNLABELED, ROAD, SIDEWALK, BUILDING, VEGETATION, SKY = 0, 7, 8, 11, 21, 23
PERSON, RIDER, CAR, BUS, TRAIN, MOTORCYCLE, BICYCLE = 24, 25, 26, 28, 31, 32, 33

# Base (source-domain) colour of each class, sRGB 0..1: a sunny, saturated game look.
BASE_COLOURS: dict[int, tuple[float, float, float]] = {
    UNLABELED: (0.10, 0.10, 0.10), ROAD: (0.36, 0.34, 0.37), SIDEWALK: (0.62, 0.56, 0.50),
    BUILDING: (0.58, 0.42, 0.33), VEGETATION: (0.22, 0.52, 0.16), SKY: (0.45, 0.66, 0.95),
    PERSON: (0.75, 0.22, 0.32), RIDER: (0.95, 0.50, 0.10), CAR: (0.16, 0.24, 0.62), BUS: (0.90, 0.75, 0.15),
    TRAIN: (0.55, 0.58, 0.64), MOTORCYCLE: (0.30, 0.12, 0.40), BICYCLE: (0.15, 0.60, 0.60),
}

# Probability that a scene holds each rare object (cyclists bring a rider and a bicycle).
RARE_PROBABILITY = {"cyclist": 0.09, "bicycle": 0.05, "motorcycle": 0.08, "bus": 0.09, "train": 0.07}

Mask = Callable[[np.ndarray, np.ndarray], np.ndarray]


class Canvas:
    """Label ids, instance ids and the instance table of one scene; shapes are painted over what is there."""

    def __init__(self, width: int, height: int, rng: np.random.Generator, colour_jitter: float) -> None:
        self.w, self.h, self.rng = width, height, rng
        self.ids = np.full((height, width), SKY, dtype=np.uint8)
        self.inst = np.zeros((height, width), dtype=np.int32)
        self.classes: list[int] = [SKY]
        self.colours: list[np.ndarray] = []
        # One colour offset per class for the whole scene, on top of each instance's own: colour alone is not
        # a perfect cue, and the net has to use shape and position too.
        self.class_shift = {c: rng.normal(0.0, colour_jitter, 3) for c in BASE_COLOURS}
        self.jitter = colour_jitter
        self.colours.append(self.colour(SKY))

    def colour(self, cls: int, gain: float = 1.0, spread: float = 1.0) -> np.ndarray:
        """A base colour of class `cls` for a new instance: class colour, scene shift, instance jitter."""
        c = np.asarray(BASE_COLOURS[cls]) + self.class_shift[cls] + self.rng.normal(0.0, self.jitter * spread, 3)
        return np.clip(c * gain, 0.0, 1.0)

    def new_instance(self, cls: int, colour: np.ndarray) -> int:
        self.classes.append(cls)
        self.colours.append(colour)
        return len(self.classes) - 1

    def paint(self, cls: int, colour: np.ndarray, box: tuple[float, float, float, float], mask: Mask | None = None,
              instance: int | None = None) -> int:
        """Paint the pixels of box (x0, y0, x1, y1; floats, clipped) where mask(yy, xx) holds; returns the instance."""
        k = self.new_instance(cls, colour) if instance is None else instance
        x0, y0 = max(0, int(np.floor(box[0]))), max(0, int(np.floor(box[1])))
        x1, y1 = min(self.w, int(np.ceil(box[2]))), min(self.h, int(np.ceil(box[3])))
        if x1 <= x0 or y1 <= y0:
            return k
        if mask is None:
            self.ids[y0:y1, x0:x1], self.inst[y0:y1, x0:x1] = cls, k
            return k
        yy, xx = np.mgrid[y0:y1, x0:x1].astype(np.float32) + 0.5  # pixel centres
        m = mask(yy, xx)
        self.ids[y0:y1, x0:x1][m], self.inst[y0:y1, x0:x1][m] = cls, k
        return k

    def ellipse(self, cls: int, colour: np.ndarray, cx: float, cy: float, rx: float, ry: float,
                instance: int | None = None) -> int:
        rx, ry = max(rx, 0.5), max(ry, 0.5)
        return self.paint(cls, colour, (cx - rx, cy - ry, cx + rx, cy + ry),
                          lambda yy, xx: ((xx - cx) / rx) ** 2 + ((yy - cy) / ry) ** 2 <= 1.0, instance)

    def ring(self, cls: int, colour: np.ndarray, cx: float, cy: float, r: float, width: float,
             instance: int | None = None) -> int:
        def mask(yy: np.ndarray, xx: np.ndarray) -> np.ndarray:
            d = np.hypot(xx - cx, yy - cy)
            return (d <= r) & (d >= r - max(width, 1.0))

        return self.paint(cls, colour, (cx - r, cy - r, cx + r, cy + r), mask, instance)


def _buildings(cv: Canvas, horizon: float) -> None:
    w, h, rng = cv.w, cv.h, cv.rng
    x = -rng.uniform(0, 0.1) * w
    while x < w:
        bw = rng.uniform(0.08, 0.25) * w
        if rng.random() < 0.15:  # a gap: sky down to trees or the horizon
            x += bw
            continue
        top = horizon - rng.uniform(0.12, 0.42) * h
        colour = cv.colour(BUILDING, gain=rng.uniform(0.8, 1.2), spread=1.5)
        bottom = horizon + 0.6 * (h - horizon)  # the ground drawn later covers what is not facade
        cv.paint(BUILDING, colour, (x, top, x + bw, bottom))
        # windows: a grid of darker (in the base style) rectangles, part of the building class
        px, py = rng.uniform(6, 11), rng.uniform(7, 12)
        fx, fy = rng.uniform(0.35, 0.6), rng.uniform(0.35, 0.6)
        x0, t0 = x + 2.0, top + 3.0
        cv.paint(BUILDING, np.clip(colour * 0.45 + np.array([0.02, 0.04, 0.10]), 0, 1), (x0, t0, x + bw - 2, horizon),
                 lambda yy, xx, x0=x0, t0=t0, px=px, py=py, fx=fx, fy=fy:
                 (((xx - x0) % px) < fx * px) & (((yy - t0) % py) < fy * py))
        x += bw


def _trees(cv: Canvas, horizon: float) -> None:
    w, h, rng = cv.w, cv.h, cv.rng
    for _ in range(rng.integers(0, 5)):
        cx, r = rng.uniform(0, w), rng.uniform(0.06, 0.16) * h
        cy = horizon - rng.uniform(0.0, 0.25) * h
        trunk = cv.colour(VEGETATION, gain=0.55)
        cv.paint(VEGETATION, trunk, (cx - 0.12 * r, cy, cx + 0.12 * r, horizon + 0.05 * h))
        cv.ellipse(VEGETATION, cv.colour(VEGETATION, gain=rng.uniform(0.8, 1.2)), cx, cy, r * 1.1, r)


def _ground(cv: Canvas, horizon: float) -> tuple[Callable[[float], tuple[float, float]], float]:
    """Road and sidewalks below the horizon; returns road_edges(y) -> (left, right) and the sidewalk width."""
    w, h, rng = cv.w, cv.h, cv.rng
    vx = rng.uniform(0.35, 0.65) * w
    left, right = vx - rng.uniform(0.45, 0.9) * w, vx + rng.uniform(0.45, 0.9) * w
    walk = rng.uniform(0.12, 0.3) * w
    depth = h - horizon

    def edges(y: float | np.ndarray) -> tuple:
        t = (y - horizon) / depth
        return vx + t * (left - vx), vx + t * (right - vx)

    def walk_mask(yy: np.ndarray, xx: np.ndarray) -> np.ndarray:
        lo, hi = edges(yy)
        t = (yy - horizon) / depth
        return (yy >= horizon) & (xx >= lo - t * walk) & (xx <= hi + t * walk)

    def road_mask(yy: np.ndarray, xx: np.ndarray) -> np.ndarray:
        lo, hi = edges(yy)
        return (yy >= horizon) & (xx >= lo) & (xx <= hi)

    def dash_mask(yy: np.ndarray, xx: np.ndarray) -> np.ndarray:
        t = (yy - horizon) / depth
        centre = vx + t * ((left + right) / 2 - vx)
        dashes = np.sqrt(np.clip(t, 0.0, None)) * 9 % 1.0 < 0.5  # dash length grows towards the camera
        return road_mask(yy, xx) & (np.abs(xx - centre) < 0.5 + 0.012 * w * t) & dashes

    box = (0, horizon, w, h)
    cv.paint(VEGETATION, cv.colour(VEGETATION, gain=0.8), box)  # verge beyond the sidewalks
    cv.paint(SIDEWALK, cv.colour(SIDEWALK), box, walk_mask)
    cv.paint(ROAD, cv.colour(ROAD), box, road_mask)
    cv.paint(ROAD, np.array([0.85, 0.85, 0.80]), box, dash_mask)  # lane marking: road, but bright
    return edges, walk


def _car(cv: Canvas, cx: float, yb: float, s: float, cls: int = CAR) -> None:
    rng = cv.rng
    bw = s * cv.w * (rng.uniform(0.28, 0.4) if cls == CAR else rng.uniform(0.45, 0.6))
    bh = bw * (rng.uniform(0.5, 0.62) if cls == CAR else rng.uniform(0.75, 0.9))
    body = cv.colour(cls, gain=rng.uniform(0.7, 1.3) if cls == CAR else 1.0, spread=2.0 if cls == CAR else 1.0)
    top = yb - bh
    cv.paint(cls, body, (cx - bw / 2, top + (0.35 * bh if cls == CAR else 0.0), cx + bw / 2, yb - 0.12 * bh))
    if cls == CAR:
        cv.paint(cls, body, (cx - bw * 0.32, top, cx + bw * 0.32, top + 0.4 * bh))
        cv.paint(cls, np.array([0.55, 0.65, 0.75]), (cx - bw * 0.27, top + 0.07 * bh, cx + bw * 0.27, top + 0.33 * bh))
    else:  # bus: a band of windows
        cv.paint(cls, np.array([0.30, 0.38, 0.45]), (cx - bw * 0.45, top + 0.15 * bh, cx + bw * 0.45, top + 0.45 * bh))
    wheel = np.array([0.06, 0.06, 0.07])
    r = 0.14 * bh if cls == CAR else 0.11 * bh
    for wx in (cx - bw * 0.3, cx + bw * 0.3):
        cv.ellipse(cls, wheel, wx, yb - r, r, r)


def _person(cv: Canvas, cx: float, yb: float, s: float, cls: int = PERSON) -> None:
    rng = cv.rng
    ph = s * cv.h * rng.uniform(0.32, 0.45)
    pw = ph * rng.uniform(0.2, 0.28)
    clothes, skin = cv.colour(cls, spread=2.0), np.array([0.85, 0.65, 0.52]) * rng.uniform(0.6, 1.1)
    legs = cv.colour(cls, gain=0.5)
    cv.paint(cls, legs, (cx - pw * 0.4, yb - 0.45 * ph, cx - pw * 0.05, yb))
    cv.paint(cls, legs, (cx + pw * 0.05, yb - 0.45 * ph, cx + pw * 0.4, yb))
    cv.paint(cls, clothes, (cx - pw / 2, yb - 0.82 * ph, cx + pw / 2, yb - 0.43 * ph))
    cv.ellipse(cls, np.clip(skin, 0, 1), cx, yb - 0.9 * ph, 0.1 * ph, 0.1 * ph)


def _two_wheeler(cv: Canvas, cx: float, yb: float, s: float, cls: int, rider: bool) -> None:
    rng = cv.rng
    r = s * cv.h * rng.uniform(0.07, 0.09)
    gap = r * 2.6
    frame = cv.colour(cls, spread=1.5)
    if cls == BICYCLE:
        for wx in (cx - gap / 2, cx + gap / 2):
            cv.ring(cls, np.array([0.08, 0.08, 0.08]), wx, yb - r, r, max(1.0, 0.25 * r))
        cv.paint(cls, frame, (cx - gap / 2, yb - r * 1.9, cx + gap / 2, yb - r * 1.55))
        cv.paint(cls, frame, (cx - 0.1 * r, yb - r * 1.9, cx + 0.3 * r, yb - r))
    else:
        for wx in (cx - gap / 2, cx + gap / 2):
            cv.ellipse(cls, np.array([0.07, 0.07, 0.07]), wx, yb - r, r, r)
        cv.ellipse(cls, frame, cx, yb - 1.5 * r, gap * 0.55, 0.7 * r)
    if rider:
        _person(cv, cx - 0.1 * gap, yb - 1.2 * r, s * 0.75, RIDER)


def draw_scene(width: int, height: int, rng: np.random.Generator, colour_jitter: float) -> Canvas:
    """One random street scene on a width x height canvas."""
    cv = Canvas(width, height, rng, colour_jitter)
    horizon = rng.uniform(0.38, 0.5) * height
    _buildings(cv, horizon)
    _trees(cv, horizon)
    if rng.random() < RARE_PROBABILITY["train"]:  # a train far away, on the horizon
        tx, tl = rng.uniform(-0.2, 0.6) * width, rng.uniform(0.3, 0.6) * width
        th = rng.uniform(0.05, 0.08) * height
        colour = cv.colour(TRAIN)
        cv.paint(TRAIN, colour, (tx, horizon - th, tx + tl, horizon + 0.02 * height))
        cv.paint(TRAIN, np.clip(colour * 0.4, 0, 1), (tx + 2, horizon - 0.75 * th, tx + tl - 2, horizon - 0.4 * th),
                 lambda yy, xx: (xx % 7) < 4)
    edges, walk = _ground(cv, horizon)
    depth = height - horizon

    def on_road(t: float) -> float:
        lo, hi = edges(horizon + t * depth)
        return rng.uniform(max(lo, 0.0) + 0.05 * width, min(hi, width) - 0.05 * width)

    def on_walk(t: float) -> float:
        lo, hi = edges(horizon + t * depth)
        side = (lo - t * walk * 0.5) if rng.random() < 0.5 else (hi + t * walk * 0.5)
        return float(np.clip(side, 0.03 * width, 0.97 * width))

    objects: list[tuple[float, Callable[[float], None]]] = []  # (depth t, draw(t))
    for _ in range(rng.integers(1, 5)):
        objects.append((rng.uniform(0.15, 1.05), lambda t: _car(cv, on_road(t), horizon + t * depth, t)))
    for _ in range(rng.integers(0, 4)):
        objects.append((rng.uniform(0.2, 1.0), lambda t: _person(cv, on_walk(t), horizon + t * depth, t)))
    rare = {name: rng.random() < p for name, p in RARE_PROBABILITY.items()}
    if rare["bus"]:
        objects.append((rng.uniform(0.25, 0.6), lambda t: _car(cv, on_road(t), horizon + t * depth, t, BUS)))
    if rare["cyclist"]:
        objects.append((rng.uniform(0.5, 1.0),
                        lambda t: _two_wheeler(cv, on_road(t), horizon + t * depth, t, BICYCLE, rider=True)))
    if rare["bicycle"]:
        objects.append((rng.uniform(0.5, 1.0),
                        lambda t: _two_wheeler(cv, on_walk(t), horizon + t * depth, t, BICYCLE, rider=False)))
    if rare["motorcycle"]:
        objects.append((rng.uniform(0.5, 1.0), lambda t: _two_wheeler(
            cv, on_road(t), horizon + t * depth, t, MOTORCYCLE, rider=bool(rng.random() < 0.5))))
    for t, draw in sorted(objects, key=lambda o: o[0]):  # far first, so near objects occlude them
        draw(t)
    if rng.random() < 0.3:  # an unlabelled clutter patch, as real data has (id 0 -> ignore)
        x, y = rng.uniform(0, width), rng.uniform(horizon, height)
        size = rng.uniform(0.02, 0.05) * width
        cv.paint(UNLABELED, cv.colour(UNLABELED), (x, y - size, x + size, y))
    return cv
