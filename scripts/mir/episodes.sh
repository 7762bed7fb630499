# Sourced by the MIR mode scripts (02–05): one set of episode settings, so every mode runs on the same
# targets, rounds and generator settings. Edit the hyperparameters here.
N_TARGETS=$(fast_or 16 300)  # the main job's share of time; the loop's own default is 200 targets x 10 rounds
ROUNDS=$(fast_or 3 5)
GEN_STEPS=$(fast_or 8 10)   # sampling steps: 10 and 20 give the same gen->real R@10 (31.0) at half the cost
# The simulated user: scene_reader (default: reads the shown image and the target with the scene reader and says what
# differs, core.shapes.scene_diff) or mtst (the CIR stage's MTST generator; another RUN_DIR, or --overwrite true)
USER_KIND="${USER_KIND:-scene_reader}"
READER_FILE="$RUN_DIR/scene_reader/scene_reader.pt"   # trained by 01_train_generator.sh on the training images only
case "$USER_KIND" in
  scene_reader) USER_SPEC="scene_reader:$READER_FILE" ;;
  mtst) USER_SPEC="$RUN_DIR/cir/mtst/checkpoint-best" ;;
  *) echo "USER_KIND must be scene_reader or mtst, got '$USER_KIND'" >&2; exit 1 ;;
esac

MIR_ARGS=(--config configs/mir/shapes.yaml
  --dialogues_json "$DATA_DIR/chatir/dialogues_test.json" --search_space_json "$DATA_DIR/chatir/search_space_test.json"
  --image_root "$DATA_DIR" --dense_checkpoint "$RUN_DIR/dense/checkpoint-best"
  --generator "$RUN_DIR/mir/generator/checkpoint-best" --user "$USER_SPEC"
  --output_dir "$RUN_DIR/mir" --n_targets "$N_TARGETS" --rounds "$ROUNDS" --gen_steps "$GEN_STEPS" --seed "$SEED")
