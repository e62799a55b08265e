"""The user's names of states, groups and weights, and raw brainstate paths in text turned into them.

brainstate keys a state by the first path its (alphabetical) traversal finds: an inhibitory population
`self.I` may appear as `EI.post.V` (through a projection), and a synapse that brainpy.state's AlignPost
merging keeps inside its post population as `E._before_updates.(<class 'brainpy.state.Expon'>, (40,),
{'tau': ...}) // (...).syn.g`. Those raw paths stay the keys everywhere (`Learner.params`,
`StateLeaf.path`, `Relation.weight`, `Group.name`, checkpoints); every display uses the names below.

The scheme (computed from the model's attributes by `fusetrace.capture.state_names`):

* a state: the shortest attribute path from the model to it, written as in Python (`I.V`,
  `layers[0].V`, `cells[fast].h` for a dict entry): breadth-first over attributes in the order they were
  set, public attributes before private ones;
* a synapse that AlignPost merging keeps inside a post population: `POST.syn[PROJ,...].STATE`, with
  PROJ the projections that feed it, in attribute order (`E.syn[inE,EE].g`: one conductance fed by
  `inE` and `EE`; past three projections the rest are counted, `E.syn[a,b,c,+2].g`); its output module
  is `POST.out[PROJ,...]`. A projection under the same parent module as the post is written relative to
  that parent (`hidden.N.syn[inp].g` for `hidden.inp`);
* reached only through private attributes: the attribute path (`inp.delay_seam._buffer.history`), with
  brainstate's update hooks written `.before[KEY]` / `.after[KEY]` (the key when short and plain, else
  its position);
* a weight leaf: its state's name plus the key inside a dict-valued state (`inE.comm.weight.weight`);
* a group: the module holding all its states, their longest common module path (`E` for `E.V` and
  `E.syn[inE].g`); when there is none, the module holding most of them (the first such: `N` for
  `N.V`, `syn_e.g`, `syn_i.g`); when that is the model itself, or another group has the same name, the
  name of its first state.

A name that two states would share gets a `~2`, `~3` ... suffix. Names are stable: they depend only on
the model's attribute structure, never on object ids or hash order.
"""

import dataclasses
import functools
import re
from collections import Counter
from collections.abc import Iterable, Mapping

MAX_LISTED_PROJECTIONS = 3  # projections listed in a merged synapse's name before the rest are counted


def join(parent: str, label: str) -> str:
    """`parent` followed by an attribute (`.x`) or item (`[k]`) label; no leading dot at the root."""
    return (parent + label).lstrip(".") if parent else label.lstrip(".")


def split(name: str) -> list[str]:
    """The dotted components of `name`, keeping brackets whole: `E.syn[a.b,c].g` -> `E`, `syn[a.b,c]`, `g`."""
    parts, depth, start = [], 0, 0
    for index, char in enumerate(name):
        depth += {"[": 1, "]": -1}.get(char, 0)
        if char == "." and depth == 0:
            parts.append(name[start:index])
            start = index + 1
    return [*parts, name[start:]]


def relative_to_parent(name: str, other: str) -> str:
    """`name` relative to the parent module of `other` when it lies under it (`hidden.inp` next to
    `hidden.N` is `inp`), else `name`."""
    parent = split(other)[:-1]
    parts = split(name)
    return ".".join(parts[len(parent) :]) if parent and parts[: len(parent)] == parent else name


def unique(names: list[str]) -> list[str]:
    """`names` with a `~2`, `~3` ... suffix on every repeat of an earlier name."""
    seen: Counter = Counter()
    out = []
    for name in names:
        seen[name] += 1
        out.append(name if seen[name] == 1 else f"{name}~{seen[name]}")
    return out


def group_names(groups: Iterable, leaves: Iterable) -> dict[str, str]:
    """`{group.name (raw): the group's name}`: the module holding all its states, else its first state's."""
    by_path = {leaf.path: leaf.name for leaf in leaves}
    groups = list(groups)
    firsts = {group.name: by_path.get(group.states[0], group.states[0]) for group in groups}
    proposed = {group.name: _population([by_path.get(p, p) for p in group.states]) for group in groups}
    taken = Counter(proposed.values())
    return {raw: name if name and taken[name] == 1 else firsts[raw] for raw, name in proposed.items()}


def _population(names: list[str]) -> str:
    """The longest common module path of the states `names`; without one, the module holding most of
    them (the first such): a neuron whose synapses live in modules of their own."""
    parents = [split(name)[:-1] for name in names]
    common = parents[0]
    for parent in parents[1:]:
        length = next((i for i, (a, b) in enumerate(zip(common, parent, strict=False)) if a != b), None)
        common = common[: min(len(common), len(parent)) if length is None else length]
    if common:
        return ".".join(common)
    counts = Counter(".".join(parent) for parent in parents)
    return max(counts, key=lambda module: (counts[module], -list(counts).index(module)))


# in text: a raw group name right after "group `", "groups (", "group(s) " is a group, not a state
_GROUP_WORD = re.compile(r"\bgroups?(?:\(s\))?[\s(`]*$")
_LIST_GAP = re.compile(r"[\s,`]*(?:and|or)?[\s`]*")


@dataclasses.dataclass(frozen=True)
class Names:
    """Raw paths <-> the user's names for one captured step.

    Attributes:
        leaves: raw leaf path and raw state path -> name.
        groups: raw group name (`Group.name`) -> the group's name.
    """

    leaves: Mapping[str, str]
    groups: Mapping[str, str] = dataclasses.field(default_factory=dict)

    @classmethod
    def of(cls, leaves: Iterable, groups: Iterable = ()) -> "Names":
        """The names of `leaves` (`StateLeaf`s) and of `groups`."""
        leaves = list(leaves)
        table = {leaf.state_path: leaf.state_name for leaf in leaves}
        table.update({leaf.path: leaf.name for leaf in leaves})
        return cls(table, group_names(groups, leaves))

    def name_of(self, path: str) -> str:
        """The name of the state or leaf at raw `path` (`path` itself when unknown)."""
        return self.leaves.get(path, path)

    def group(self, raw: str) -> str:
        """The name of the group whose raw name is `raw` (`raw` itself when unknown)."""
        return self.groups.get(raw, raw)

    def resolve(self, text: str) -> str | None:
        """The raw path (or raw group name) that `text` — a raw path, a name or a group's name — means."""
        if text in self.leaves or text in self.groups:
            return text
        for table in (self.leaves, self.groups):
            found = next((raw for raw, name in table.items() if name == text), None)
            if found is not None:
                return found
        return None

    def translate(self, text: str) -> str:
        """`text` with every raw path written as its name (a group's name after the word "group")."""
        pattern = self._pattern
        if pattern is None:
            return text
        out, last, in_groups = [], 0, False
        for match in pattern.finditer(text):
            between = text[last : match.start()]
            in_groups = bool(_GROUP_WORD.search(between)) or (in_groups and bool(_LIST_GAP.fullmatch(between)))
            raw = match.group(0)
            out += [between, self.groups[raw] if in_groups and raw in self.groups else self.name_of(raw)]
            last = match.end()
        return "".join([*out, text[last:]])

    @functools.cached_property
    def _pattern(self) -> re.Pattern | None:
        """One regular expression matching every raw path whose name differs, longest first."""
        changed = {raw for raw, name in self.leaves.items() if raw != name}
        changed |= {raw for raw, name in self.groups.items() if raw != name}
        if not changed:
            return None
        alternatives = "|".join(re.escape(raw) for raw in sorted(changed, key=lambda raw: (-len(raw), raw)))
        return re.compile(rf"(?<![\w.\[])(?:{alternatives})(?![\w\[])")
