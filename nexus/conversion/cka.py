"""Linear centred kernel alignment (CKA) between two sets of hidden states of the same tokens.

``CKA(X, Y) = ||Yc^T Xc||_F^2 / (||Xc^T Xc||_F ||Yc^T Yc||_F)`` with ``Xc``, ``Yc`` the column-centred (tokens x
features) matrices (Kornblith et al. 2019, "Similarity of Neural Network Representations Revisited"). It is 1 for
representations equal up to rotation and isotropic scaling, needs no common width, and compares *the same tokens*
row by row, so it only means something when student and teacher tokenise the text identically.
"""

import numpy as np
import torch


def linear_cka(x, y):
    """Linear CKA of two (tokens, features) matrices with the same number of rows; a float in [0, 1]."""
    x, y = torch.as_tensor(x, dtype=torch.float64), torch.as_tensor(y, dtype=torch.float64)
    if x.ndim != 2 or y.ndim != 2 or x.shape[0] != y.shape[0]:
        raise ValueError(f"CKA needs two (tokens, features) matrices of the same tokens, got {tuple(x.shape)} and "
                         f"{tuple(y.shape)}")
    x = x - x.mean(0, keepdim=True)
    y = y - y.mean(0, keepdim=True)
    # Gram form (tokens x tokens) when there are fewer tokens than features: the same number, cheaper
    if x.shape[0] < max(x.shape[1], y.shape[1]):
        kx, ky = x @ x.T, y @ y.T
        cross, nx, ny = (kx * ky).sum(), kx.norm(), ky.norm()
    else:
        cross, nx, ny = (y.T @ x).pow(2).sum(), (x.T @ x).norm(), (y.T @ y).norm()
    if nx == 0 or ny == 0:
        return float("nan")  # a constant representation carries no structure to compare
    return float(cross / (nx * ny))


def cka_matrix(student_layers, teacher_layers):
    """(student layers x teacher layers) CKA matrix; each argument is a list of (tokens, features) arrays."""
    return np.array([[linear_cka(s, t) for t in teacher_layers] for s in student_layers])


def depth_matched(n_student, n_teacher):
    """For each student layer, the teacher layer at the same relative depth (first with first, last with last)."""
    if n_student == 1:
        return [n_teacher - 1]
    return [round(i * (n_teacher - 1) / (n_student - 1)) for i in range(n_student)]
