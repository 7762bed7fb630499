# Sourced by the MIR mode scripts (02–05): one set of episode settings, so every mode runs on the same
# targets, rounds and generator settings. Edit the hyperparameters here.
N_TARGETS=$(fast_or 16 100)  # the main job's share of time; the loop's own default is 200 targets x 10 rounds
ROUNDS=$(fast_or 3 5)
GEN_STEPS=$(fast_or 8 10)   # sampling steps: 10 and 20 give the same gen->real R@10 (31.0) at half the cost

MIR_ARGS=(--config configs/mir/shapes.yaml
  --dialogues_json "$DATA_DIR/chatir/dialogues_test.json" --search_space_json "$DATA_DIR/chatir/search_space_test.json"
  --image_root "$DATA_DIR" --dense_checkpoint "$RUN_DIR/dense/checkpoint-best"
  --generator "$RUN_DIR/mir/generator/checkpoint-best" --user "$RUN_DIR/cir/mtst/checkpoint-best"
  --output_dir "$RUN_DIR/mir" --n_targets "$N_TARGETS" --rounds "$ROUNDS" --gen_steps "$GEN_STEPS" --seed "$SEED")
