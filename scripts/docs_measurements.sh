#!/usr/bin/env bash
# Every run behind the numbers in README.md and docs/, and the commands that print their tables.
#
#   scripts/docs_measurements.sh validation   # choices: validation worlds (data.seed 1, 2) only
#   scripts/docs_measurements.sh reported     # the reported world (data.seed 0), master seeds 0, 1, 2
#   scripts/docs_measurements.sh tables       # the markdown tables pasted into the docs
#   scripts/docs_measurements.sh adaptive     # the adaptive-attack and detection cells (reported world)
#   scripts/docs_measurements.sh adaptive_templates   # (part of adaptive) template-captioned BadCLIP / ke_adaptive
#   scripts/docs_measurements.sh adaptive_tables
#   scripts/docs_measurements.sh detection_sweep  # detect_filter at lower poison rates (reported world)
#   scripts/docs_measurements.sh detection_warmup  # the same with a detector trained as long as the victim
#   scripts/docs_measurements.sh detection_sweep_tables
#
# Runs are sequential on purpose: on a 2-core machine parallel torch jobs each run
# up to 10x slower. A run whose record exists is skipped, so the script resumes.
# CPU, small preset: about 1 minute a run once the world's base model is cached.
set -euo pipefail
VAL=${VAL:-results/validation}
REP=${REP:-results/reported}
SEEDS=${SEEDS:-"0 1 2"}
run() { shieldbench run -q "$@" >/dev/null; }

# Semantic Shield settings named in the docs.
SS_PAPER="--set defense.variant=weighted_attn --set defense.weight_form=raw --set defense.weight_score=own"
SS_GATE="--set defense.variant=weighted_attn"
SS_ATTN="--set defense.variant=attn"
SS_KE="--set defense.variant=ke"

validation() {
  # WaNet strength and targeted captions per image (docs/attacks.md, "Small-preset departures")
  VAL="$VAL" python "$(dirname "$0")/choose_small_defaults.py" wanet
  VAL="$VAL" python "$(dirname "$0")/choose_small_defaults.py" targeted
  # RoCLIP crop in the small preset (docs/baselines.md), on clean data
  for w in 1 2; do
    for c in 0.08 0.5 1.0; do run -a none -d roclip -o "$VAL" --set data.seed=$w --set defense.crop_min_scale=$c; done
  done
}

reported() {
  for s in $SEEDS; do
    for a in none badnets blended wanet label_consistent targeted; do run -a $a -d none -s $s -o "$REP"; done
    for a in badnets blended wanet targeted; do run -a $a -d semantic_shield -s $s -o "$REP"; done
    for a in badnets blended wanet; do run -a $a -d cleanclip -s $s -o "$REP"; done
    run -a targeted -d roclip -s $s -o "$REP"
  done
  # The paper's raw weighting collapses on this world (docs/semantic_shield.md): one master seed.
  for a in badnets blended wanet targeted; do run -a $a -d semantic_shield -s 0 -o "$REP" $SS_PAPER; done
  # Variant ablation.
  for s in $SEEDS; do
    for a in badnets blended wanet; do
      for v in "$SS_GATE" "$SS_ATTN" "$SS_KE"; do run -a $a -d semantic_shield -s $s -o "$REP" $v; done
    done
  done
}

tables() {
  # No training times: these runs shared the 2 cores with other work, so their train_s is noise;
  # the costs in the docs come from benchmarks/ and from timed runs on an idle machine.
  M=clean_top1,asr,asr_base_model,hit@1,i2t_R@1
  echo "## README"
  shieldbench leaderboard -o "$REP" --attacks none,badnets,wanet --defenses none,semantic_shield \
    --setting "-,variant=weighted_ke" --format markdown --metrics clean_top1,asr,asr_base_model,hit@1
  echo "## attacks, no defense (docs/attacks.md)"
  shieldbench leaderboard -o "$REP" --defenses none --format markdown --metrics $M,poison_success
  echo "## Semantic Shield: none, default, paper (docs/semantic_shield.md, README)"
  shieldbench leaderboard -o "$REP" --attacks badnets,blended,wanet,targeted --defenses none,semantic_shield \
    --setting "-,variant=weighted_ke,weight_form=raw" --format markdown --metrics $M,poison_success
  echo "## Semantic Shield variants (docs/semantic_shield.md)"
  shieldbench leaderboard -o "$REP" --attacks badnets,blended,wanet --defenses semantic_shield --format markdown \
    --metrics clean_top1,asr,hit@1
  echo "## CleanCLIP (docs/baselines.md)"
  shieldbench leaderboard -o "$REP" --attacks badnets,blended,wanet --defenses cleanclip --format markdown \
    --metrics clean_top1_before_repair,clean_top1,asr_before_repair,asr,asr_base_model,hit@1
  echo "## RoCLIP (docs/baselines.md)"
  shieldbench leaderboard -o "$REP" --attacks targeted --defenses none,roclip --format markdown \
    --metrics clean_top1,poison_success,poison_hit@1,i2t_R@1
  echo "## validation runs (docs/attacks.md, docs/baselines.md)"
  shieldbench leaderboard -o "$VAL" --format markdown --metrics clean_top1,asr,asr_base_model,poison_success,i2t_R@1
}

adaptive() {
  # BadCLIP and ke_adaptive against each defense, detect_filter against the patch/blend/warp
  # attacks, with the baselines they are read against; seed by seed, so a stop leaves whole seeds.
  for s in $SEEDS; do
    for a in badnets blended wanet badclip ke_adaptive; do run -a $a -d none -s $s -o "$REP"; done
    for a in badnets badclip; do run -a $a -d cleanclip -s $s -o "$REP"; done
    for a in badnets badclip ke_adaptive; do run -a $a -d semantic_shield -s $s -o "$REP"; done
    for a in badnets blended wanet; do run -a $a -d detect_filter -s $s -o "$REP"; done
  done
  adaptive_templates
}

adaptive_templates() {
  # The grounding term alone: with template captions Semantic Shield's gate silences BadCLIP's
  # poisons as it silences BadNets'; does ke_adaptive's patch get them through?
  for s in $SEEDS; do
    for a in badclip ke_adaptive; do run -a $a -d semantic_shield -s $s -o "$REP" --set attack.captions=templates; done
  done
}

adaptive_tables() {
  echo "## BadCLIP and ke_adaptive (docs/attacks.md, docs/semantic_shield.md)"
  shieldbench leaderboard -o "$REP" --attacks badnets,badclip,ke_adaptive --defenses none,cleanclip,semantic_shield \
    --format markdown --metrics clean_top1,asr,asr_base_model,hit@1
  echo "## detect_filter (docs/baselines.md)"
  shieldbench leaderboard -o "$REP" --attacks badnets,blended,wanet --defenses none,detect_filter --format markdown \
    --metrics detection_auroc,detection_recall,clean_top1,asr,asr_base_model
}

detection_sweep() {
  # detect_filter toward the paper's regime (0.01-0.1% poisons on CC3M): the same cells at 1% and
  # 0.5% (80 and 40 poisons of 8,000). A measurement only; no default is chosen from it.
  for s in $SEEDS; do
    for r in 0.01 0.005; do
      for a in badnets blended; do
        for d in none detect_filter; do run -a $a -d $d -s $s -o "$REP" --set attack.poison_rate=$r; done
      done
    done
  done
}

detection_warmup() {
  # The detector trained as long as the victim (3 epochs in this preset), the paper's setting of a
  # CLIP trained on the poisoned data, at each rate of the sweep. An ablation: the default stays 1.
  for s in $SEEDS; do
    for r in 0.005 0.01 0.02; do
      for a in badnets blended; do run -a $a -d detect_filter -s $s -o "$REP" --set attack.poison_rate=$r --set defense.warmup_epochs=3; done
    done
  done
}

detection_sweep_tables() {
  echo "## detect_filter by poison rate (docs/baselines.md)"
  shieldbench leaderboard -o "$REP" --attacks badnets,blended --defenses none,detect_filter --format markdown \
    --metrics detection_auroc,detection_recall,clean_top1,asr,asr_base_model
}

"${1:?validation | reported | tables | adaptive | adaptive_templates | adaptive_tables | detection_sweep | detection_warmup | detection_sweep_tables}"
