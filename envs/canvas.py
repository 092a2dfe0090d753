"""A tiny numpy rasterizer for the analytic envs' ``rgb_array`` frames (no pygame needed)."""

from __future__ import annotations

import numpy as np

__all__ = ["Canvas"]

Color = tuple[int, int, int]


class Canvas:
    """An RGB image over a rectangle of the plane (world units, y up).

    Args:
        width, height: frame size in pixels.
        extent: ``(x_min, x_max, y_min, y_max)`` of the world rectangle shown.
        background: RGB fill color.
    """

    def __init__(
        self,
        width: int,
        height: int,
        extent: tuple[float, float, float, float],
        background: Color = (255, 255, 255),
    ) -> None:
        x0, x1, y0, y1 = extent
        xs = x0 + (np.arange(width) + 0.5) * (x1 - x0) / width
        ys = y1 - (np.arange(height) + 0.5) * (y1 - y0) / height  # row 0 at the top
        self._X, self._Y = np.meshgrid(xs, ys)  # [height, width] world coordinates of pixels
        self.image = np.empty((height, width, 3), dtype=np.uint8)
        self.image[:] = background

    def segment(self, p0, p1, width: float, color: Color) -> None:
        """A thick segment (round caps) from ``p0`` to ``p1``, ``width`` in world units."""
        a, b = np.asarray(p0, dtype=np.float64), np.asarray(p1, dtype=np.float64)
        d = b - a
        t = ((self._X - a[0]) * d[0] + (self._Y - a[1]) * d[1]) / max(float(d @ d), 1e-12)
        t = np.clip(t, 0.0, 1.0)
        dist2 = (self._X - a[0] - t * d[0]) ** 2 + (self._Y - a[1] - t * d[1]) ** 2
        self.image[dist2 <= (0.5 * width) ** 2] = color

    def disk(self, center, radius: float, color: Color) -> None:
        """A filled disk."""
        dist2 = (self._X - center[0]) ** 2 + (self._Y - center[1]) ** 2
        self.image[dist2 <= radius**2] = color

    def box(self, center, half_size, color: Color) -> None:
        """A filled axis-aligned rectangle with half side lengths ``half_size = (hx, hy)``."""
        inside = (np.abs(self._X - center[0]) <= half_size[0]) & (
            np.abs(self._Y - center[1]) <= half_size[1]
        )
        self.image[inside] = color
