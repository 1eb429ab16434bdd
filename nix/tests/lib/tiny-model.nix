# The integration tests' tiny random-weight llama GGUF (about 17 MB), made by
# the repository's generator with the tokenizer of llama.cpp's own
# vocab-only test file, from the llama-cpp source nixpkgs builds.
{
  runCommand,
  python3,
  llama-cpp,
}:
runCommand "claracore-tiny-model.gguf"
  {
    nativeBuildInputs = [
      (python3.withPackages (ps: [
        ps.gguf
        ps.numpy
      ]))
    ];
  }
  ''
    # The generator writes OUT.tmp.PID beside OUT: keep that out of the store.
    python3 ${../../../tests/tools/make-tiny-model.py} \
      --vocab ${llama-cpp.src}/models/ggml-vocab-llama-spm.gguf \
      --out tiny.gguf
    mv tiny.gguf $out
  ''
