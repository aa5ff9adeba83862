"""Coordinate frames of MRML nodes under parent transforms (MRML only, no Qt).

The core works in a node's own, untransformed frame ("local"): the input is exported without its
parent transform, so the fitted network and the result's voxels live there. A slice view's plane
is in world coordinates. These helpers convert between the two, for linear transforms only: a
non-linear (warping) transform has no single matrix, and is refused with a message.
"""
from __future__ import annotations

import numpy as np
import vtk


class FrameError(ValueError):
    """A transform that the conversion cannot follow; the message says what to do."""


def to_numpy(matrix: "vtk.vtkMatrix4x4") -> np.ndarray:
    return np.array([[matrix.GetElement(i, j) for j in range(4)] for i in range(4)])


def to_vtk(array: np.ndarray) -> "vtk.vtkMatrix4x4":
    m = vtk.vtkMatrix4x4()
    for i in range(4):
        for j in range(4):
            m.SetElement(i, j, float(array[i][j]))
    return m


def local_to_world(node) -> np.ndarray:
    """4x4 matrix from `node`'s own frame to world (identity without a parent transform)."""
    parent = node.GetParentTransformNode()
    if parent is None:
        return np.eye(4)
    if not parent.IsTransformToWorldLinear():
        raise FrameError(f"'{node.GetName()}' is under the non-linear transform '{parent.GetName()}': harden the "
                         "transform on a copy of the node (Data module: right-click → Harden transform), or remove it")
    m = vtk.vtkMatrix4x4()
    parent.GetMatrixTransformToWorld(m)
    return to_numpy(m)


def world_to_local(node) -> np.ndarray:
    """4x4 matrix from world to `node`'s own frame."""
    return np.linalg.inv(local_to_world(node))


def between(source, target) -> np.ndarray:
    """4x4 matrix from `source`'s own frame to `target`'s own frame."""
    if source.GetParentTransformNode() is target.GetParentTransformNode():
        return np.eye(4)
    return world_to_local(target) @ local_to_world(source)
