"""SyntheticPoses: procedurally drawn people with the 16 MPII joints, on cluttered
backgrounds. Needs no files or network; deterministic for a (seed, index).

Each person is an articulated stick body: random but plausible limb lengths and joint angles,
global rotation, size and position, seen from the front or the back. The person's right limbs
are drawn in warm colours and the left ones in cool colours (the cue that tells left from
right, as a face or a shirt pattern does in photographs), upper and lower limb segments in
different shades of them (the cue for elbows and knees, as sleeves and trousers are); the
draw order of the two sides is random, so limbs occlude each other, and now and then the
torso hides them; the background holds gradients, noise and distracting shapes in the same
colours. Some people reach out of the frame: those joints have visibility 0.

The colour code is chiral: a mirrored synthetic person is not one (its warm limbs are on its
left), so neither flip augmentation nor the flip test suits this data.
"""
import math

import cv2
import numpy as np

from fasthg.data.records import PoseRecord

# Lengths as fractions of the person's height.
THIGH, SHIN, TORSO, NECK, HEAD = 0.25, 0.24, 0.30, 0.05, 0.13
UPPER_ARM, FOREARM, HIP_HALF, SHOULDER_HALF = 0.17, 0.15, 0.09, 0.12
LIMBS_RIGHT = ((2, 1), (1, 0), (12, 11), (11, 10))  # r hip-knee, knee-ankle, r shoulder-elbow, elbow-wrist
LIMBS_LEFT = ((3, 4), (4, 5), (13, 14), (14, 15))


def _rotate(v, degrees):
    a = math.radians(degrees)
    c, s = math.cos(a), math.sin(a)
    return np.array([c * v[0] - s * v[1], s * v[0] + c * v[1]])


def _pose(rng: np.random.Generator, height: float, pelvis: np.ndarray) -> np.ndarray:
    """The 16 joints (x, y) of a random plausible pose."""
    j = np.zeros((16, 2))
    tilt = rng.normal(0, 15) if rng.random() < 0.8 else rng.uniform(-60, 60)
    up = _rotate(np.array([0.0, -1.0]), tilt)
    across = _rotate(up, 90)  # screen-right of an upright body
    facing = 1 if rng.random() < 0.6 else -1  # front: the person's right is on screen-left
    right = -across * facing
    j[6] = pelvis
    torso_up = _rotate(up, rng.normal(0, 8))
    j[7] = pelvis + torso_up * TORSO * height
    j[8] = j[7] + _rotate(torso_up, rng.normal(0, 10)) * NECK * height
    j[9] = j[8] + _rotate(torso_up, rng.normal(0, 15)) * HEAD * height
    j[2] = pelvis + right * HIP_HALF * height
    j[3] = pelvis - right * HIP_HALF * height
    shoulder_base = j[7] - torso_up * 0.02 * height
    j[12] = shoulder_base + right * SHOULDER_HALF * height
    j[13] = shoulder_base - right * SHOULDER_HALF * height
    down = -up
    for hip, knee, ankle, side in ((2, 1, 0, 1), (3, 4, 5, -1)):
        out = side * facing  # legs swing outwards more often than inwards
        thigh = _rotate(down, rng.uniform(-35, 35) - 8 * out * (1 if right[0] * out < 0 else -1))
        j[knee] = j[hip] + thigh * THIGH * height * rng.uniform(0.9, 1.1)
        j[ankle] = j[knee] + _rotate(thigh, rng.uniform(-100, 100) * rng.random()) * SHIN * height * rng.uniform(0.9, 1.1)
    for shoulder, elbow, wrist in ((12, 11, 10), (13, 14, 15)):
        arm = _rotate(down, rng.uniform(-170, 170))
        j[elbow] = j[shoulder] + arm * UPPER_ARM * height * rng.uniform(0.9, 1.1)
        j[wrist] = j[elbow] + _rotate(arm, rng.uniform(-140, 140)) * FOREARM * height * rng.uniform(0.9, 1.1)
    return j


def _colour(rng, hue_lo, hue_hi):
    """An RGB colour with an OpenCV hue (0..180) in [hue_lo, hue_hi]."""
    hsv = np.uint8([[[rng.uniform(hue_lo, hue_hi) % 180, rng.uniform(150, 255), rng.uniform(130, 255)]]])
    return tuple(int(c) for c in cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)[0, 0])


def _background(rng, size: int) -> np.ndarray:
    a, b = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
    t = np.linspace(0, 1, size)[:, None, None]
    img = (a * (1 - t) + b * t) * np.ones((1, size, 1))
    if rng.random() < 0.5:
        img = img.transpose(1, 0, 2)
    img = img + rng.normal(0, 12, img.shape)
    img = np.clip(img, 0, 255).astype(np.uint8)
    for _ in range(rng.integers(2, 8)):
        kind = rng.integers(3)
        colour = _colour(rng, 0, 180) if rng.random() < 0.7 else tuple(int(c) for c in rng.integers(0, 256, 3))
        p = rng.uniform(0, size, 2).astype(int)
        if kind == 0:
            cv2.circle(img, tuple(p), int(rng.uniform(0.02, 0.12) * size), colour, -1, cv2.LINE_AA)
        elif kind == 1:
            q = p + rng.uniform(-0.2, 0.2, 2) * size
            cv2.rectangle(img, tuple(p), tuple(q.astype(int)), colour, -1)
        else:  # limb-like strokes: the clutter that makes a network look at the layout
            q = p + rng.uniform(-0.3, 0.3, 2) * size
            cv2.line(img, tuple(p), tuple(q.astype(int)), colour, int(rng.uniform(0.01, 0.04) * size) + 1, cv2.LINE_AA)
    return img


class SyntheticPoses:
    """`n` generated people; item i is a PoseRecord whose image is in extra["pixels"]
    (image_size x image_size x 3, RGB, uint8). Same (seed, i), same record and pixels."""

    def __init__(self, n: int, image_size: int = 256, seed: int = 0, cache_bytes: int = 0):
        """cache_bytes: keep drawn people (read-only) up to this many bytes of pixels, so that
        every epoch after the first crops them instead of drawing them again (drawing is most
        of the data pipeline's time). The cache is per process: a DataLoader worker's dies
        with it."""
        if n < 1 or image_size < 32:
            raise ValueError(f"SyntheticPoses: need n >= 1 and image_size >= 32, got n={n}, image_size={image_size}")
        if cache_bytes < 0:
            raise ValueError(f"SyntheticPoses: cache_bytes must be >= 0, got {cache_bytes}")
        self.n, self.image_size, self.seed = n, image_size, seed
        self.cache_bytes, self._cache, self._cached_bytes = cache_bytes, {}, 0

    def __len__(self):
        return self.n

    def __getitem__(self, i: int) -> PoseRecord:
        if not 0 <= i < self.n:
            raise IndexError(f"SyntheticPoses index {i} out of range for {self.n} records")
        if i in self._cache:
            return self._cache[i]
        record = self._record(i)
        size = record.extra["pixels"].nbytes
        if self._cached_bytes + size <= self.cache_bytes:
            for a in (record.center, record.joints, record.visible, record.extra["pixels"]):
                a.flags.writeable = False  # shared by every later epoch: nobody may draw on it
            self._cache[i] = record
            self._cached_bytes += size
        return record

    def _record(self, i: int) -> PoseRecord:
        rng = np.random.default_rng([self.seed, i])
        size = self.image_size
        height = size * rng.uniform(0.45, 0.8)
        pelvis = np.array([size / 2, size / 2 + 0.05 * height]) + rng.normal(0, 0.12 * size, 2)
        joints = _pose(rng, height, pelvis)
        img = _background(rng, size)
        self._draw(img, joints, height, rng)
        visible = ((joints >= 0) & (joints <= size - 1)).all(1).astype(np.float64)
        lo, hi = joints.min(0), joints.max(0)
        # MPII's PCKh normaliser: 0.6 x the diagonal of a square head box (upper neck to top).
        head_size = 0.6 * math.sqrt(2) * float(np.linalg.norm(joints[9] - joints[8]))
        return PoseRecord(center=(lo + hi) / 2, scale=max(hi - lo) / 200.0, joints=joints, visible=visible,
                          head_size=head_size, index=i, extra={"pixels": img})

    @staticmethod
    def _draw(img, joints, height, rng):
        width = max(2, int(rng.uniform(0.05, 0.08) * height))
        # (upper, lower) segment colours; OpenCV hues wrap at 180.
        warm = [_colour(rng, -10, 5), _colour(rng, 15, 30)]     # right: reds, then oranges to yellows
        cool = [_colour(rng, 85, 102), _colour(rng, 112, 130)]  # left: cyans, then blues
        torso = _colour(rng, 40, 75)                            # greens
        p = lambda k: tuple(int(round(c)) for c in joints[k])  # noqa: E731

        def limbs(pairs, colours):
            for (a, b), colour in zip(pairs, colours * 2):
                cv2.line(img, p(a), p(b), colour, width, cv2.LINE_AA)
                cv2.circle(img, p(b), width // 2 + 1, colour, -1, cv2.LINE_AA)

        def body():
            cv2.fillConvexPoly(img, np.array([p(2), p(12), p(13), p(3)], np.int32), torso, cv2.LINE_AA)
            cv2.line(img, p(7), p(8), torso, width, cv2.LINE_AA)
            centre = tuple(int(c) for c in (joints[8] + joints[9]) / 2)
            radius = max(2, int(np.linalg.norm(joints[9] - joints[8]) / 2))
            cv2.circle(img, centre, radius, _colour(rng, 140, 165), -1, cv2.LINE_AA)  # purples

        sides = [lambda: limbs(LIMBS_RIGHT, warm), lambda: limbs(LIMBS_LEFT, cool)]
        order = [body] + [sides[k] for k in rng.permutation(2)]  # the sides hide each other
        if rng.random() < 0.15:  # and sometimes the torso hides them
            order = order[1:] + order[:1]
        for draw in order:
            draw()
