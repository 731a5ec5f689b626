"""Registers the built-in plugins as lazy ``module:attr`` entries.

Importing this module imports no plugin code; each class is imported the first
time its name is looked up (``Registry.get``).
"""

from __future__ import annotations

import json
from importlib import resources

from shieldbench.registry import ATTACKS, DATASETS, DEFENSES, KNOWLEDGE, MODELS

BUILTIN_ATTACKS = {
    "none": "shieldbench.attacks.none:NoAttack",
    "badnets": "shieldbench.attacks.badnets:BadNets",
    "blended": "shieldbench.attacks.blended:Blended",
    "wanet": "shieldbench.attacks.wanet:WaNet",
    "label_consistent": "shieldbench.attacks.label_consistent:LabelConsistent",
    "targeted": "shieldbench.attacks.targeted:TargetedPoisoning",
    "badclip": "shieldbench.attacks.badclip:BadCLIP",
    "ke_adaptive": "shieldbench.attacks.badclip:KEAdaptive",
}
BUILTIN_DEFENSES = {
    "none": "shieldbench.defenses.none:NoDefense",
    "semantic_shield": "shieldbench.defenses.semantic_shield:SemanticShield",
    "cleanclip": "shieldbench.defenses.cleanclip:CleanCLIP",
    "roclip": "shieldbench.defenses.roclip:RoCLIP",
    "detect_filter": "shieldbench.defenses.detect_filter:DetectFilter",
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


# What `shieldbench list KIND` shows for each built-in without importing it (torch, open_clip).
# tests/test_registry.py checks that every entry equals the class's own attributes.
BUILTIN_METADATA: dict[str, dict[str, dict[str, str]]] = {'attacks': {'badclip': {'description': 'Optimised centre patch + natural target captions, on a frozen clean '
                                        'surrogate (Liang et al., CVPR 2024).',
                         'paper': 'Liang et al., CVPR 2024, BadCLIP: Dual-Embedding Guided Backdoor Attack on '
                                  'Multimodal Contrastive Learning',
                         'threat_model': 'dirty_label'},
             'ke_adaptive': {'description': "BadCLIP plus a term that raises Semantic Shield's KE grounding of "
                                            'triggered images with target captions.',
                             'paper': 'adaptive attack on Semantic Shield (Ishmam & Thomas, CVPR 2024), built on '
                                      'Liang et al., CVPR 2024, BadCLIP',
                             'threat_model': 'dirty_label'},
             'badnets': {'description': 'Patch trigger + target caption (Gu et al. 2017; CLIP: Carlini & Terzis '
                                        '2022).',
                         'paper': 'Gu et al., BadNets, 2017; Carlini & Terzis, ICLR 2022',
                         'threat_model': 'dirty_label'},
             'blended': {'description': "Full-image blend x'=(1-a)x+a*k + target caption (Chen et al. 2017; CLIP: "
                                        'CleanCLIP).',
                         'paper': 'Chen et al., Targeted Backdoor Attacks ... Data Poisoning, 2017; Bansal et '
                                  'al., CleanCLIP, ICCV 2023',
                         'threat_model': 'dirty_label'},
             'label_consistent': {'description': 'Clean-label: BadNets patch on pairs whose caption names the '
                                                 'target, captions kept (Turner et al. 2019).',
                                  'paper': 'Turner et al., Label-Consistent Backdoor Attacks, 2019; Bansal et '
                                           'al., CleanCLIP, ICCV 2023',
                                  'threat_model': 'clean_label'},
             'none': {'description': 'No poisons (clean training); evaluated with the BadNets trigger as a '
                                     'control.',
                      'paper': 'control',
                      'threat_model': 'none'},
             'targeted': {'description': 'Held-out target images paired with many target-class captions, no '
                                         'trigger (Carlini & Terzis 2022; RoCLIP).',
                          'paper': 'Carlini & Terzis, Poisoning and Backdooring Contrastive Learning, ICLR 2022; '
                                   'Yang et al., RoCLIP, NeurIPS 2023',
                          'threat_model': 'targeted'},
             'wanet': {'description': 'Smooth image warp + target caption, optional noise mode (Nguyen & Tran, '
                                      'ICLR 2021).',
                       'paper': 'Nguyen & Tran, WaNet - Imperceptible Warping-based Backdoor Attack, ICLR 2021',
                       'threat_model': 'dirty_label'}},
 'datasets': {'coco': {'description': 'COCO 2017 captions, one training row per caption; retrieval on the '
                                      'Karpathy test split (5K images).'},
              'csv': {'description': "Image paths and captions in a CSV (open_clip_train's convention: filepath / "
                                     'title, tab separated).'},
              'flickr30k': {'description': 'Flickr30k, Karpathy split: one training row per caption; retrieval on '
                                           'its 1K test images.'},
              'synthetic': {'description': 'Embedded procedural shapes world: 10 classes, captions, knowledge '
                                           'elements (no download).'},
              'webdataset': {'description': 'Tar shards as img2dataset writes them (<key>.jpg/.png + <key>.txt), '
                                            'brace-expanded shard lists.'}},
 'defenses': {'detect_filter': {'description': 'Pre-training: drop the pairs whose image embedding is a local outlier '
                                               '(LID / DAO / SLOF / k-dist), then train (Huang et al. 2025).',
                                'paper': 'Huang et al., Detecting Backdoor Samples in Contrastive Language Image '
                                         'Pretraining, ICLR 2025'},
              'cleanclip': {'description': 'Post-training: fine-tune on clean pairs with CLIP + in-modal '
                                           'self-supervised loss (Bansal et al. 2023).',
                            'paper': 'Bansal et al., CleanCLIP, ICCV 2023'},
              'none': {'description': 'Plain CLIP training, no defense (the baseline).',
                       'paper': 'Radford et al., CLIP, 2021'},
              'roclip': {'description': 'Training-time: match images to their nearest caption in a FIFO pool '
                                        'every K-th epoch (Yang et al. 2023).',
                         'paper': 'Yang et al., RoCLIP, NeurIPS 2023'},
              'semantic_shield': {'description': 'Knowledge elements from a language model ground patches; '
                                                 'ungrounded pairs are down-weighted.',
                                  'paper': 'Ishmam & Thomas, Semantic Shield, CVPR 2024'}},
 'knowledge': {'file': {'description': "KEs from a JSONL file, per caption or per class (the paper's COCO "
                                       'setting).'},
               'lexicon': {'description': 'Rule-based content-word chunks of the caption (no model; exactly k).'},
               'llm': {'description': 'A transformers causal LM asked for K visual elements per caption (greedy, '
                                      'batched).'},
               'synthetic': {'description': "The synthetic world's vocabulary, read off the caption text (exactly "
                                            'k).'}},
 'models': {'micro-vit': {'description': 'ViT, patch 8, width 64, 2+2 layers (tests)'},
            'tiny-rn': {'description': 'ModifiedResNet (attention pool) with one block per stage'},
            'tiny-vit': {'description': 'ViT, patch 8 (16 tokens at 32 px), width 128, 4+4 layers (CPU default)'}}}


def builtin_params() -> dict[str, dict[str, list[dict]]]:
    """The options' schema of each built-in attack and defense (``builtin_params.json``).

    Written by ``python scripts/write_builtin_params.py``; tests/test_cli_light.py
    checks that it equals each class's own ``Params``.
    """
    return json.loads(resources.files("shieldbench").joinpath("builtin_params.json").read_text())


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
            reg.set_metadata(name, BUILTIN_METADATA[reg.kind][name])
    for reg in (ATTACKS, DEFENSES):
        for name, schema in builtin_params()[reg.kind].items():
            reg.set_params_schema(name, schema)


register_builtins()
