# The training image for GKE (XPK or a JobSet) and other container schedulers.
#   docker build --build-arg ACCELERATOR=tpu -t IMAGE .      # Cloud TPU (jax[tpu])
#   docker build --build-arg ACCELERATOR=cuda12 -t IMAGE .   # NVIDIA GPUs (jax[cuda12])
#   docker build --build-arg ACCELERATOR=cpu -t IMAGE .      # CPU only
# The image runs `python -m leo_jax.train ...` (the launchers in launch/ pass the command).
FROM python:3.11-slim
ARG ACCELERATOR=tpu
ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /opt/leo_jax
COPY requirements.txt .
RUN jax_version="$(sed -n 's/^jax==//p' requirements.txt)" \
 && case "$ACCELERATOR" in \
      tpu) extra="jax[tpu]==$jax_version" ;; \
      cuda12) extra="jax[cuda12]==$jax_version" ;; \
      cpu) extra="" ;; \
      *) echo "ACCELERATOR must be tpu, cuda12 or cpu, got $ACCELERATOR" >&2; exit 2 ;; \
    esac \
 && pip install -r requirements.txt $extra
COPY . .
ENV PYTHONPATH=/opt/leo_jax
CMD ["python", "-m", "leo_jax.train", "--help"]
