-- The queue and the GPU: how long each request waited for its model, and
-- the GPU its model ran on with the GPU's used memory before and after it
-- and its utilization (from the GPU readings, sampled every
-- gpu.sample_interval); the GPU and peak GPU memory of each model run
-- (what a model learns to need); GPU memory in the resource samples.
ALTER TABLE requests ADD COLUMN queue_wait_ms REAL;
ALTER TABLE requests ADD COLUMN gpu INTEGER;
ALTER TABLE requests ADD COLUMN gpu_mem_before_bytes INTEGER;
ALTER TABLE requests ADD COLUMN gpu_mem_after_bytes INTEGER;
ALTER TABLE requests ADD COLUMN gpu_utilization REAL;
ALTER TABLE model_events ADD COLUMN gpu INTEGER;
ALTER TABLE model_events ADD COLUMN vram_bytes INTEGER;
ALTER TABLE samples ADD COLUMN vram_bytes INTEGER;
