"""Coupled channel dimensions: a union-find over channel groups, with refinement.

Every dimension of every tensor in a traced model is a :data:`Dim`: a tuple of :class:`Seg` that
concatenate. A segment is a channel *group* whose channels each repeat ``inner`` times contiguously
(``inner > 1`` after flattening a ``C x H x W`` map into a Linear). Groups that must have the same
width are unified; a group that has to be cut (``chunk``, slicing, ``cat`` against a single conv
output) is *refined* into child groups, everywhere at once.

Flags on a group:

- ``source``: produced by a conv or linear output, so it may change width;
- ``fixed``: must keep its width (image channels, classes, spatial dims).

An atomic group scales iff it is a source and not fixed.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import MorphError

__all__ = ["Seg", "Dim", "Groups", "CouplingError"]


class CouplingError(MorphError):
    """Two dims cannot be coupled (sizes or block structure differ)."""


@dataclass(frozen=True)
class Seg:
    """``group``'s channels, each repeated ``inner`` times contiguously."""

    group: int
    inner: int = 1


Dim = tuple[Seg, ...]


class Groups:
    """Union-find over channel groups, with refinement of a group into ordered children."""

    def __init__(self) -> None:
        self.parent: list[int] = []
        self.size: list[int] = []
        self.source: list[bool] = []
        self.fixed: list[bool] = []
        self.structural: list[bool] = []
        self.children: dict[int, list[int]] = {}
        self.alias: dict[int, Seg] = {}  # root -> the group it repeats ``inner`` times
        self.derived: dict[int, list[Seg]] = {}  # root -> atoms it scales with (channel shuffle)
        self.heads: set[int] = set()  # groups made by :meth:`repeat`: attention heads

    # -- creation -------------------------------------------------------------------------------
    def new(self, size: int, *, source: bool = False, fixed: bool = False, structural: bool = False) -> int:
        gid = len(self.parent)
        self.parent.append(gid)
        self.size.append(int(size))
        self.source.append(source)
        self.fixed.append(fixed)
        self.structural.append(structural)
        return gid

    def derive(self, size: int, like: Dim) -> Dim:
        """A new group that scales iff the atoms of ``like`` scale, without being coupled to them
        element by element (the channels of a shuffled view)."""
        gid = self.new(size)
        self.derived[gid] = self.atoms(like)
        return (Seg(gid, 1),)

    def new_dim(self, size: int, **flags: bool) -> Dim:
        return (Seg(self.new(size, **flags), 1),)

    # -- queries --------------------------------------------------------------------------------
    def find(self, g: int) -> int:
        root = g
        while self.parent[root] != root:
            root = self.parent[root]
        while self.parent[g] != root:
            self.parent[g], g = root, self.parent[g]
        return root

    def atoms(self, dim: Dim) -> list[Seg]:
        """Expand a dim into unrefined root groups, in order."""
        out: list[Seg] = []
        for seg in dim:
            out.extend(Seg(a.group, a.inner * seg.inner) for a in self._expand(seg.group))
        return out

    def _expand(self, g: int) -> list[Seg]:
        r = self.find(g)
        if r in self.alias:
            s = self.alias[r]
            return [Seg(a.group, a.inner * s.inner) for a in self._expand(s.group)]
        if r not in self.children:
            return [Seg(r, 1)]
        out: list[Seg] = []
        for c in self.children[r]:
            out.extend(self._expand(c))
        return out

    def length(self, dim: Dim) -> int:
        return sum(self.size[s.group] * s.inner for s in self.atoms(dim))

    def is_structural(self, dim: Dim) -> bool:
        return all(self.structural[s.group] for s in self.atoms(dim))

    def scales(self, g: int) -> bool:
        r = self.find(g)
        if r in self.alias:
            return self.scales(self.alias[r].group)
        if self.fixed[r]:
            return False
        if r in self.derived and any(self.scales(s.group) for s in self.derived[r]):
            return True
        return self.source[r]

    # -- mutation -------------------------------------------------------------------------------
    def mark_fixed(self, dim: Dim) -> None:
        for s in self.atoms(dim):
            self.fixed[s.group] = True

    def mark_source(self, dim: Dim) -> None:
        for s in self.atoms(dim):
            self.source[s.group] = True

    def refine(self, g: int, sizes: list[int]) -> list[int]:
        """Cut root group ``g`` into children of the given sizes (in channel order)."""
        r = self.find(g)
        assert r not in self.children and sum(sizes) == self.size[r], (sizes, self.size[r])
        kids = [
            self.new(n, source=self.source[r], fixed=self.fixed[r], structural=self.structural[r]) for n in sizes
        ]
        if r in self.derived:
            for k in kids:
                self.derived[k] = list(self.derived[r])
        self.children[r] = kids
        return kids

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            return
        if ra in self.children or rb in self.children:
            self.unify((Seg(ra, 1),), (Seg(rb, 1),))
            return
        if self.size[ra] != self.size[rb]:
            raise CouplingError(f"channel groups of width {self.size[ra]} and {self.size[rb]} must match")
        self.parent[rb] = ra
        if rb in self.derived:
            self.derived.setdefault(ra, []).extend(self.derived.pop(rb))
        self.source[ra] |= self.source[rb]
        self.fixed[ra] |= self.fixed[rb]
        self.structural[ra] &= self.structural[rb]

    def unify(self, d1: Dim, d2: Dim) -> None:
        """Couple two dims element by element, refining groups where their cuts differ."""
        n1, n2 = self.length(d1), self.length(d2)
        if n1 != n2:
            raise CouplingError(f"dims of size {n1} and {n2} cannot be coupled")
        while True:
            a1, a2 = self.atoms(d1), self.atoms(d2)
            i = j = 0
            p1 = p2 = 0  # element offset consumed inside current atoms
            refined = False
            pairs: list[tuple[Seg, Seg]] = []
            while i < len(a1) and j < len(a2):
                s1, s2 = a1[i], a2[j]
                l1 = self.size[s1.group] * s1.inner - p1
                l2 = self.size[s2.group] * s2.inner - p2
                if p1 or p2 or l1 != l2:
                    # cut the longer atom so that both end at the same element
                    cut = min(l1, l2)
                    if l1 > cut:
                        refined = self._cut(s1, p1 + cut)
                    else:
                        refined = self._cut(s2, p2 + cut)
                    break
                pairs.append((s1, s2))
                i += 1
                j += 1
            if refined:
                continue
            for s1, s2 in pairs:
                if s1.inner == s2.inner:
                    self.union(s1.group, s2.group)
                elif s1.inner % s2.inner == 0:
                    self._alias(s2.group, Seg(s1.group, s1.inner // s2.inner))
                elif s2.inner % s1.inner == 0:
                    self._alias(s1.group, Seg(s2.group, s2.inner // s1.inner))
                else:
                    raise CouplingError(
                        f"dims with different block structure ({s1.inner} vs {s2.inner} repeated channels)"
                    )
            return

    def repeat(self, g: int, size: int, inner: int) -> int:
        """Make root ``g`` (``size * inner`` channels) the channels of a new group of ``size`` channels, each
        repeated ``inner`` times (the heads of an attention projection, each ``inner = head_dim`` wide);
        returns the new group."""
        r = self.find(g)
        if r in self.children or r in self.alias or self.size[r] != size * inner:
            raise CouplingError(f"a group of {self.size[r]} channels cannot be read as {size} blocks of {inner}")
        h = self.new(size, source=self.source[r], fixed=self.fixed[r])
        self._alias(r, Seg(h, inner))
        self.heads.add(h)
        return h

    def _alias(self, g: int, target: Seg) -> None:
        """Make root ``g`` an alias of ``target.group`` with each channel repeated ``target.inner`` times
        (channel shuffle: a conv output coupled with an interleaved view of another group)."""
        r, t = self.find(g), self.find(target.group)
        assert r not in self.children and r not in self.alias and r != t
        self.alias[r] = Seg(t, target.inner)
        self.source[t] |= self.source[r]
        self.fixed[t] |= self.fixed[r]

    def _cut(self, seg: Seg, at: int) -> bool:
        if at % seg.inner:
            raise CouplingError(f"cannot cut a block of {seg.inner} repeated channels at element {at}")
        n = at // seg.inner
        self.refine(seg.group, [n, self.size[self.find(seg.group)] - n])
        return True

    def split(self, dim: Dim, lengths: list[int]) -> list[Dim]:
        """Cut a dim into consecutive pieces of the given element lengths (refining as needed)."""
        bounds, acc = [], 0
        for n in lengths[:-1]:
            acc += n
            bounds.append(acc)
        for b in bounds:
            self._ensure_cut(dim, b)
        pieces: list[list[Seg]] = [[] for _ in lengths]
        pos, k = 0, 0
        for s in self.atoms(dim):
            n = self.size[s.group] * s.inner
            while k < len(bounds) and pos >= bounds[k]:
                k += 1
            pieces[k].append(s)
            pos += n
        return [tuple(p) for p in pieces]

    def _ensure_cut(self, dim: Dim, at: int) -> None:
        while True:
            pos = 0
            for s in self.atoms(dim):
                n = self.size[s.group] * s.inner
                if pos < at < pos + n:
                    self._cut(s, at - pos)
                    break
                pos += n
            else:
                return
