# Sourced (not run) by the tools/h200 scripts, from the repository root: makes
# Keras importable on the H200, whose Python has JAX but not Keras, from the wheels
# carried in .whl/ (tools/h200/prepare.sh downloads them), then puts this checkout
# first on PYTHONPATH. A machine still warm from an earlier call reuses the
# installed copy. $PYTHON (default python3) is the interpreter.
_keras_site=/tmp/tf_bf16_site
_keras_python="${PYTHON:-python3}"
if ! "$_keras_python" -c "import keras" 2>/dev/null; then
  if ! PYTHONPATH="$_keras_site${PYTHONPATH:+:$PYTHONPATH}" "$_keras_python" -c "import keras" \
      2>/dev/null; then
    echo "[$(date +%H:%M:%S)] installing Keras from .whl/"
    "$_keras_python" -m pip install -q --no-index --no-deps --no-compile --upgrade \
        --target "$_keras_site" .whl/*.whl || echo "[$(date +%H:%M:%S)] pip install failed"
  fi
  export PYTHONPATH="$_keras_site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
unset _keras_site _keras_python
