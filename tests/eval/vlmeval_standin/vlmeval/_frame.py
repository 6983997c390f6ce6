"""The part of a pandas DataFrame that the shim and the stand-in use: columns as lists, ``iloc``
(an int gives a row mapping, a slice a frame), ``len``, ``in`` (a column), item get / set / pop,
``copy`` and ``to_dict(orient="records")``."""


class Row(dict):
    """A row (pandas: a Series indexed by column)."""


class Frame:
    def __init__(self, columns=None):
        self._cols = {k: list(v) for k, v in (columns or {}).items()}
        if len({len(v) for v in self._cols.values()}) > 1:
            raise ValueError("columns of different lengths")

    @classmethod
    def from_records(cls, records):
        keys = []
        for r in records:
            keys += [k for k in r if k not in keys]
        return cls({k: [r.get(k) for r in records] for k in keys})

    @property
    def columns(self):
        return list(self._cols)

    def __len__(self):
        return len(next(iter(self._cols.values()), []))

    def __contains__(self, col):
        return col in self._cols

    def __getitem__(self, col):
        return list(self._cols[col])

    def __setitem__(self, col, values):
        values = list(values) if isinstance(values, (list, tuple)) else [values] * len(self)
        if self._cols and len(values) != len(self):
            raise ValueError(f"column {col!r}: {len(values)} values for {len(self)} rows")
        self._cols[col] = values

    def pop(self, col):
        return self._cols.pop(col)

    def copy(self):
        return Frame(self._cols)

    def to_dict(self, orient="records"):
        if orient != "records":
            raise NotImplementedError(orient)
        return [dict(self.iloc[i]) for i in range(len(self))]

    @property
    def iloc(self):
        frame = self

        class _ILoc:
            def __getitem__(self, key):
                if isinstance(key, slice):
                    return Frame({k: v[key] for k, v in frame._cols.items()})
                return Row({k: v[key] for k, v in frame._cols.items()})
        return _ILoc()
