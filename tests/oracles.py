"""Plain transcriptions of the reference code (dense, slow) used as oracles by the method tests."""

from __future__ import annotations

import math

import numpy as np
from scipy.cluster.hierarchy import fcluster, linkage
from scipy.spatial.distance import cdist


# ----------------------------------------------------------------------------- COINCIDE (cluster_wise_prune.py)

def gaussian_kernel(X, Y, sigma):
    X_norm = (X ** 2).sum(1).reshape(-1, 1)
    Y_norm = (Y ** 2).sum(1).reshape(1, -1)
    d = X_norm + Y_norm - 2.0 * X @ Y.T
    return np.exp(-d / (2 * sigma ** 2))


def greedy_mmd_selection(K, M):
    """Reference: rebuild MMD² of every candidate set from scratch at each step."""
    n = len(K)
    indices = np.arange(n)
    selected = np.array([], dtype=int)
    K_XX = K.mean()
    for _ in range(M):
        candidates = np.setdiff1d(indices, selected)
        temp = np.concatenate([np.tile(selected, (len(candidates), 1)), candidates[:, None]], axis=1)
        K_XY = K[:, temp].mean(axis=(0, 2))
        K_YY = K[temp[:, :, None], temp[:, None, :]].mean(axis=(1, 2))
        mmd = K_XX + K_YY - 2 * K_XY
        selected = np.append(selected, candidates[np.argmin(mmd)])
    return selected


def transferability_reference(centroids, n_layers, thr=0.9):
    K, F = centroids.shape
    h = F // (2 * n_layers)
    c = centroids.reshape(K, n_layers, 2 * h)[:, :, h:].reshape(K, -1).astype(np.float64)
    nrm = np.linalg.norm(c, axis=1, keepdims=True)
    cn = np.where(nrm > 0, c / np.where(nrm > 0, nrm, 1), 0)
    cos = cn @ cn.T
    mask = cos > thr
    cos[mask] = 0
    with np.errstate(invalid="ignore", divide="ignore"):
        t = cos.sum(-1) / (~mask).sum(-1)
    return np.nan_to_num(t, nan=0.0)


def density_dense(x, labels, k, sigma=1.0):
    out = np.full(k, np.nan)
    for c in range(k):
        idx = np.flatnonzero(labels == c)
        if len(idx):
            xc = x[idx].astype(np.float64)
            out[c] = gaussian_kernel(xc, xc, sigma).mean()
    return out


def coincide_prune(x, labels, transfer, budget, temp, sigma):
    """Quota loop as written in the reference (clusters are assumed non-empty, ids 0..K-1).

    Only deviation: descending order ties broken by lowest cluster id (np.argsort(-score, stable)).
    """
    k = len(transfer)
    dens = density_dense(x, labels, k, sigma)
    score = (1 / dens) * transfer
    ratio = np.exp(score / temp) / np.sum(np.exp(score / temp))
    sort_idx = np.argsort(-score, kind="stable")
    ratio = ratio[sort_idx]
    score = score[sort_idx]
    remaining = budget
    selected = []
    for idx, c in enumerate(sort_idx):
        members = np.flatnonzero(labels == c)
        q = round(remaining * ratio[idx])
        if q > len(members):
            pick = members
        else:
            xc = x[members].astype(np.float64)
            pick = members[greedy_mmd_selection(gaussian_kernel(xc, xc, sigma), q)]
        selected.append(pick)
        remaining -= len(pick)
        ratio[idx + 1:] = np.exp(score[idx + 1:] / temp) / np.sum(np.exp(score[idx + 1:] / temp))
    return np.concatenate(selected)


# ----------------------------------------------------------------------------- DataTailor

def ward_reference(x, ratio=0.1):
    z = linkage(np.asarray(x, dtype=np.float64), method="ward")
    return fcluster(z, t=ratio * z[-1][2], criterion="distance") - 1


def uniqueness_dense(h, v, labels):
    out = np.zeros(len(h))
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        d = cdist(h[idx].astype(np.float64), h[idx].astype(np.float64))
        avg = d.sum() / len(idx)
        for p, i in enumerate(idx):
            out[i] = (d[p] * v[idx]).sum() / avg if avg > 0 else np.nan  # the code's 0/0 (torch: NaN)
    return out


def uniqueness_paper_dense(h, v, labels):
    out = np.zeros(len(h))
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        d = cdist(h[idx].astype(np.float64), h[idx].astype(np.float64))
        vs = v[idx].sum()
        for p, i in enumerate(idx):
            m = np.arange(len(idx)) != p
            out[i] = (d[p, m] * v[idx][m]).sum() / vs if vs > 0 else 0.0
    return out


def association_loop(h, labels, cluster_task):
    K = len(cluster_task)
    mu = [h[labels == c].astype(np.float64).mean(0) for c in range(K)]
    A = np.zeros(K)
    for i in range(K):
        s, cnt = 0.0, 0
        for j in range(K):
            if i != j and cluster_task[i] == cluster_task[j]:
                s += math.exp(mu[i] @ mu[j] / np.linalg.norm(mu[i]) / np.linalg.norm(mu[j]))
                cnt += 1
        A[i] = s / cnt if cnt else math.e
    return A


def datatailor_reference(h, v, tau, n_turns, tasks, budget, ratio=0.1):
    """Reference pipeline with dense matrices; task budgets use the shared largest-remainder helper
    (the code rounds half-up and has no cap)."""
    from datasel_ray.methods.budget import allocate_proportional

    names, ti = np.unique(tasks, return_inverse=True)
    labels = np.zeros(len(h), dtype=int)
    ctask = []
    off = 0
    for t in range(len(names)):
        rows = np.flatnonzero(ti == t)
        lab = ward_reference(h[rows], ratio) if len(rows) > 1 else np.zeros(1, dtype=int)
        labels[rows] = lab + off
        ctask += [t] * (lab.max() + 1)
        off += lab.max() + 1
    U = uniqueness_dense(h, v, labels)
    A = association_loop(h, labels, np.array(ctask))
    R = A[labels] * v
    sizes = np.bincount(ti)
    taumean = np.array([tau[ti == t].mean() for t in range(len(names))])
    kb = allocate_proportional(sizes * taumean ** 2, budget, caps=sizes)
    sel = []
    for t in range(len(names)):
        rows = np.flatnonzero(ti == t)
        n = len(rows)
        rk = lambda a: np.argsort(np.argsort(a, kind="stable"), kind="stable") / n  # noqa: E731
        r = np.maximum(1, n_turns[rows])
        pair = [((rk(v[rows])[p] * r[p] + rk(U[rows])[p] + rk(R[rows])[p]) / (r[p] + 2), i)
                for p, i in enumerate(rows)]
        pair = sorted(pair, key=lambda tup: tup[0], reverse=True)  # stable: ties keep lowest index first
        sel += [i for _, i in pair[:kb[t]]]
    return np.sort(np.array(sel, dtype=int)), labels, U, R
