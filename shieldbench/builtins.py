"""Registers the built-in plugins as lazy ``module:attr`` entries.

Importing this module imports no plugin code; each class is imported the first
time its name is looked up (``Registry.get``).
"""

from __future__ import annotations

from shieldbench.registry import ATTACKS, DATASETS, DEFENSES, KNOWLEDGE, MODELS

BUILTIN_ATTACKS = {
    "none": "shieldbench.attacks.none:NoAttack",
    "badnets": "shieldbench.attacks.badnets:BadNets",
    "blended": "shieldbench.attacks.blended:Blended",
    "wanet": "shieldbench.attacks.wanet:WaNet",
    "label_consistent": "shieldbench.attacks.label_consistent:LabelConsistent",
    "targeted": "shieldbench.attacks.targeted:TargetedPoisoning",
}
BUILTIN_DEFENSES = {
    "none": "shieldbench.defenses.none:NoDefense",
    "semantic_shield": "shieldbench.defenses.semantic_shield:SemanticShield",
    "cleanclip": "shieldbench.defenses.cleanclip:CleanCLIP",
    "roclip": "shieldbench.defenses.roclip:RoCLIP",
}
BUILTIN_DATASETS = {
    "synthetic": "shieldbench.data.datasets:synthetic_world",
    "csv": "shieldbench.data.datasets:csv_corpus",
    "webdataset": "shieldbench.data.datasets:webdataset_corpus",
    "coco": "shieldbench.data.datasets:coco_corpus",
    "flickr30k": "shieldbench.data.datasets:flickr30k_corpus",
}
BUILTIN_MODELS = {
    "tiny-vit": "shieldbench.models.factory:tiny_vit",
    "micro-vit": "shieldbench.models.factory:micro_vit",
    "tiny-rn": "shieldbench.models.factory:tiny_rn",
}
BUILTIN_KNOWLEDGE: dict[str, str] = {
    "synthetic": "shieldbench.knowledge.synthetic:SyntheticSource",
    "llm": "shieldbench.knowledge.llm:LlmSource",
    "file": "shieldbench.knowledge.file:FileSource",
    "lexicon": "shieldbench.knowledge.lexicon:LexiconSource",
}


def register_builtins() -> None:
    for reg, entries in (
        (ATTACKS, BUILTIN_ATTACKS),
        (DEFENSES, BUILTIN_DEFENSES),
        (DATASETS, BUILTIN_DATASETS),
        (MODELS, BUILTIN_MODELS),
        (KNOWLEDGE, BUILTIN_KNOWLEDGE),
    ):
        for name, target in entries.items():
            if name not in reg._entries:  # already imported modules registered the object
                reg.add(name, target)


register_builtins()
