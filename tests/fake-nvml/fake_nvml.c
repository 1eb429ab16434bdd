/*
 * A fake NVML (libnvidia-ml.so.1) for claracore's tests: the entry points
 * that claracore's calls through nvml-wrapper resolve (src/gpu.rs lists
 * them), answering from a state file instead of a driver.
 *
 * The state file is $FAKE_NVML_STATE, or else `fake-nvml.state` beside this
 * library (for a test process, whose environment is fixed, that loads a
 * copy from its own directory). It is read again at every query, so a test
 * changes the "hardware" by rewriting it (write a temporary file, rename).
 * One directive a line; `#` starts a comment:
 *
 *   gpu <index> <name> total_mib=<n> used_mib=<n> util=<pct> temp=<c> power_mw=<n>
 *   proc <mib> <cmdline substring>
 *   fail init
 *
 * `gpu`: one device; the name has no spaces; util, temp and power_mw are
 * optional, and a missing one is NOT_SUPPORTED on that device. Indexes run
 * from 0 without gaps (the device count is the number of gpu lines).
 * `proc`: every live process whose command line (its arguments joined by
 * spaces) contains the substring (the rest of the line) is a compute
 * process using <mib> MiB on the GPU named by the first entry of its
 * CUDA_VISIBLE_DEVICES (GPU 0 when absent or not a number), and that GPU's
 * used memory grows by as much. The first matching rule wins.
 * `fail init`: nvmlInit_v2 fails as without a driver. So does a missing
 * state file.
 *
 * Everything is bounded: long lines are cut, extra GPUs, rules and
 * processes are ignored, odd input is skipped rather than trusted.
 */
#define _GNU_SOURCE
#include <ctype.h>
#include <dirent.h>
#include <dlfcn.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* The parts of nvml.h used here, by their documented values and layout. */
typedef unsigned int nvmlReturn_t;
#define NVML_SUCCESS 0u
#define NVML_ERROR_UNINITIALIZED 1u
#define NVML_ERROR_INVALID_ARGUMENT 2u
#define NVML_ERROR_NOT_SUPPORTED 3u
#define NVML_ERROR_INSUFFICIENT_SIZE 7u
#define NVML_ERROR_DRIVER_NOT_LOADED 9u

typedef struct fake_device *nvmlDevice_t;

typedef struct {
    unsigned int version;
    unsigned long long total;
    unsigned long long reserved;
    unsigned long long free;
    unsigned long long used;
} nvmlMemory_v2_t;

typedef struct {
    unsigned int gpu;
    unsigned int memory;
} nvmlUtilization_t;

/* nvmlProcessInfo_t of the _v3 process queries (nvmlProcessInfo_v2_t). */
typedef struct {
    unsigned int pid;
    unsigned long long usedGpuMemory;
    unsigned int gpuInstanceId;
    unsigned int computeInstanceId;
} nvmlProcessInfo_t;

#define MAX_GPUS 16
#define MAX_RULES 32
#define MAX_MATCHES 256
#define NAME_LEN 96
#define NEEDLE_LEN 256
#define LINE_LEN 1024
#define CMDLINE_LEN 4096
#define ENVIRON_LEN 65536
#define MIB (1024ull * 1024ull)
#define NO_INSTANCE 0xFFFFFFFFu

struct fake_device {
    unsigned int index;
};
static struct fake_device devices[MAX_GPUS];

struct gpu {
    char name[NAME_LEN];
    unsigned long long total_mib, used_mib;
    int has_util, has_temp, has_power;
    unsigned int util, temp, power_mw;
};

struct rule {
    unsigned long long mib;
    char needle[NEEDLE_LEN];
};

struct match {
    unsigned int pid, gpu;
    unsigned long long mib;
};

struct state {
    int fail_init;
    unsigned int ngpus;
    struct gpu gpus[MAX_GPUS];
    unsigned int nrules;
    struct rule rules[MAX_RULES];
    unsigned int nmatches;
    struct match matches[MAX_MATCHES];
};

static int state_path(char *out, size_t len) {
    const char *env = getenv("FAKE_NVML_STATE");
    if (env && *env) {
        return snprintf(out, len, "%s", env) < (int)len ? 0 : -1;
    }
    Dl_info info;
    if (!dladdr((void *)&state_path, &info) || !info.dli_fname) return -1;
    const char *slash = strrchr(info.dli_fname, '/');
    if (!slash) return snprintf(out, len, "fake-nvml.state") < (int)len ? 0 : -1;
    int dir = (int)(slash - info.dli_fname);
    return snprintf(out, len, "%.*s/fake-nvml.state", dir, info.dli_fname) < (int)len ? 0 : -1;
}

static int parse_uint(const char *text, unsigned long long *out) {
    char *end;
    if (!isdigit((unsigned char)*text)) return -1;
    unsigned long long v = strtoull(text, &end, 10);
    if (*end != '\0') return -1;
    *out = v;
    return 0;
}

static void parse_gpu(struct state *s, char *rest) {
    char *save = NULL;
    char *index = strtok_r(rest, " \t", &save);
    char *name = strtok_r(NULL, " \t", &save);
    unsigned long long v;
    if (!index || !name || parse_uint(index, &v) || v != s->ngpus || s->ngpus >= MAX_GPUS) return;
    struct gpu *g = &s->gpus[s->ngpus];
    memset(g, 0, sizeof *g);
    snprintf(g->name, sizeof g->name, "%s", name);
    for (char *kv; (kv = strtok_r(NULL, " \t", &save));) {
        char *eq = strchr(kv, '=');
        if (!eq) continue;
        *eq = '\0';
        if (parse_uint(eq + 1, &v)) continue;
        if (!strcmp(kv, "total_mib")) g->total_mib = v;
        else if (!strcmp(kv, "used_mib")) g->used_mib = v;
        else if (!strcmp(kv, "util")) g->util = (unsigned int)(v > 100 ? 100 : v), g->has_util = 1;
        else if (!strcmp(kv, "temp")) g->temp = (unsigned int)(v > 1000 ? 1000 : v), g->has_temp = 1;
        else if (!strcmp(kv, "power_mw")) g->power_mw = (unsigned int)(v > 10000000 ? 10000000 : v), g->has_power = 1;
    }
    s->ngpus++;
}

static void parse_proc(struct state *s, char *rest) {
    char *save = NULL;
    char *mib = strtok_r(rest, " \t", &save);
    unsigned long long v;
    if (!mib || parse_uint(mib, &v) || s->nrules >= MAX_RULES) return;
    char *needle = save;
    while (needle && (*needle == ' ' || *needle == '\t')) needle++;
    if (!needle || !*needle) return;
    struct rule *r = &s->rules[s->nrules++];
    r->mib = v;
    snprintf(r->needle, sizeof r->needle, "%s", needle);
}

/* Reads up to len - 1 bytes of a file; the count, or -1. */
static long read_file(const char *path, char *buf, size_t len) {
    FILE *f = fopen(path, "rb");
    if (!f) return -1;
    size_t n = fread(buf, 1, len - 1, f);
    fclose(f);
    buf[n] = '\0';
    return (long)n;
}

/* The first entry of CUDA_VISIBLE_DEVICES in a process's environment. */
static unsigned int visible_gpu(unsigned long long pid) {
    static _Thread_local char env[ENVIRON_LEN];
    char path[64];
    snprintf(path, sizeof path, "/proc/%llu/environ", pid);
    long n = read_file(path, env, sizeof env);
    const char *key = "CUDA_VISIBLE_DEVICES=";
    for (long i = 0; i < n; i += (long)strlen(env + i) + 1) {
        if (strncmp(env + i, key, strlen(key))) continue;
        const char *value = env + i + strlen(key);
        if (!isdigit((unsigned char)*value)) return 0;
        unsigned long v = strtoul(value, NULL, 10);
        return v < MAX_GPUS ? (unsigned int)v : 0;
    }
    return 0;
}

/* Processes that match a rule, as the driver would list them. */
static void scan_processes(struct state *s) {
    static _Thread_local char cmd[CMDLINE_LEN];
    if (!s->nrules) return;
    DIR *proc = opendir("/proc");
    if (!proc) return;
    for (struct dirent *e; (e = readdir(proc)) && s->nmatches < MAX_MATCHES;) {
        unsigned long long pid;
        if (parse_uint(e->d_name, &pid) || pid == 0 || pid > 0xFFFFFFFFull) continue;
        char path[64];
        snprintf(path, sizeof path, "/proc/%llu/cmdline", pid);
        long n = read_file(path, cmd, sizeof cmd);
        if (n <= 0) continue; /* gone, or a kernel thread */
        while (n > 0 && cmd[n - 1] == '\0') n--;
        for (long i = 0; i < n; i++)
            if (cmd[i] == '\0') cmd[i] = ' ';
        cmd[n] = '\0';
        for (unsigned int r = 0; r < s->nrules; r++) {
            if (!strstr(cmd, s->rules[r].needle)) continue;
            struct match *m = &s->matches[s->nmatches++];
            m->pid = (unsigned int)pid;
            m->gpu = visible_gpu(pid);
            m->mib = s->rules[r].mib;
            break;
        }
    }
    closedir(proc);
}

/* Reads the state file; -1 when it is missing. */
static int load(struct state *s) {
    char path[4096], line[LINE_LEN];
    memset(s, 0, sizeof *s);
    if (state_path(path, sizeof path)) return -1;
    FILE *f = fopen(path, "r");
    if (!f) return -1;
    while (fgets(line, sizeof line, f)) {
        size_t len = strlen(line);
        if (len && line[len - 1] != '\n' && !feof(f)) {
            int c; /* a longer line: the rest is dropped */
            while ((c = fgetc(f)) != EOF && c != '\n') {}
        }
        char *hash = strchr(line, '#');
        if (hash) *hash = '\0';
        len = strlen(line);
        while (len && isspace((unsigned char)line[len - 1])) line[--len] = '\0';
        char *p = line;
        while (*p == ' ' || *p == '\t') p++;
        if (!strncmp(p, "gpu ", 4) || !strncmp(p, "gpu\t", 4)) parse_gpu(s, p + 4);
        else if (!strncmp(p, "proc ", 5) || !strncmp(p, "proc\t", 5)) parse_proc(s, p + 5);
        else if (!strcmp(p, "fail init")) s->fail_init = 1;
    }
    fclose(f);
    scan_processes(s);
    for (unsigned int i = 0; i < s->nmatches; i++)
        if (s->matches[i].gpu < s->ngpus) s->gpus[s->matches[i].gpu].used_mib += s->matches[i].mib;
    return 0;
}

/* The state, and the device's GPU in it, or an error to return. */
static nvmlReturn_t device_state(nvmlDevice_t device, struct state *s, struct gpu **g) {
    if (load(s)) return NVML_ERROR_UNINITIALIZED;
    uintptr_t at = (uintptr_t)device, first = (uintptr_t)devices;
    if (at < first || at >= first + sizeof devices || (at - first) % sizeof devices[0] ||
        device->index >= s->ngpus)
        return NVML_ERROR_INVALID_ARGUMENT;
    *g = &s->gpus[device->index];
    return NVML_SUCCESS;
}

nvmlReturn_t nvmlInit_v2(void) {
    struct state s;
    if (load(&s)) return NVML_ERROR_UNINITIALIZED;
    return s.fail_init ? NVML_ERROR_DRIVER_NOT_LOADED : NVML_SUCCESS;
}

nvmlReturn_t nvmlShutdown(void) { return NVML_SUCCESS; }

const char *nvmlErrorString(nvmlReturn_t result) {
    switch (result) {
    case NVML_SUCCESS: return "Success";
    case NVML_ERROR_UNINITIALIZED: return "Uninitialized";
    case NVML_ERROR_INVALID_ARGUMENT: return "Invalid Argument";
    case NVML_ERROR_NOT_SUPPORTED: return "Not Supported";
    case NVML_ERROR_INSUFFICIENT_SIZE: return "Insufficient Size";
    case NVML_ERROR_DRIVER_NOT_LOADED: return "Driver Not Loaded";
    default: return "Unknown Error";
    }
}

nvmlReturn_t nvmlSystemGetDriverVersion(char *version, unsigned int length) {
    if (!version || length < 1) return NVML_ERROR_INVALID_ARGUMENT;
    snprintf(version, length, "fake-nvml");
    return NVML_SUCCESS;
}

nvmlReturn_t nvmlDeviceGetCount_v2(unsigned int *count) {
    struct state s;
    if (!count) return NVML_ERROR_INVALID_ARGUMENT;
    if (load(&s)) return NVML_ERROR_UNINITIALIZED;
    *count = s.ngpus;
    return NVML_SUCCESS;
}

nvmlReturn_t nvmlDeviceGetHandleByIndex_v2(unsigned int index, nvmlDevice_t *device) {
    struct state s;
    if (!device || index >= MAX_GPUS) return NVML_ERROR_INVALID_ARGUMENT;
    if (load(&s)) return NVML_ERROR_UNINITIALIZED;
    if (index >= s.ngpus) return NVML_ERROR_INVALID_ARGUMENT;
    devices[index].index = index;
    *device = &devices[index];
    return NVML_SUCCESS;
}

nvmlReturn_t nvmlDeviceGetName(nvmlDevice_t device, char *name, unsigned int length) {
    struct state s;
    struct gpu *g;
    nvmlReturn_t r = device_state(device, &s, &g);
    if (r != NVML_SUCCESS) return r;
    if (!name || length <= strlen(g->name)) return NVML_ERROR_INSUFFICIENT_SIZE;
    snprintf(name, length, "%s", g->name);
    return NVML_SUCCESS;
}

nvmlReturn_t nvmlDeviceGetMemoryInfo_v2(nvmlDevice_t device, nvmlMemory_v2_t *memory) {
    struct state s;
    struct gpu *g;
    nvmlReturn_t r = device_state(device, &s, &g);
    if (r != NVML_SUCCESS) return r;
    if (!memory) return NVML_ERROR_INVALID_ARGUMENT;
    unsigned long long used = g->used_mib > g->total_mib ? g->total_mib : g->used_mib;
    memory->total = g->total_mib * MIB;
    memory->reserved = 0;
    memory->used = used * MIB;
    memory->free = (g->total_mib - used) * MIB;
    return NVML_SUCCESS;
}

nvmlReturn_t nvmlDeviceGetUtilizationRates(nvmlDevice_t device, nvmlUtilization_t *utilization) {
    struct state s;
    struct gpu *g;
    nvmlReturn_t r = device_state(device, &s, &g);
    if (r != NVML_SUCCESS) return r;
    if (!utilization) return NVML_ERROR_INVALID_ARGUMENT;
    if (!g->has_util) return NVML_ERROR_NOT_SUPPORTED;
    utilization->gpu = g->util;
    utilization->memory = 0;
    return NVML_SUCCESS;
}

nvmlReturn_t nvmlDeviceGetTemperature(nvmlDevice_t device, unsigned int sensor, unsigned int *temp) {
    struct state s;
    struct gpu *g;
    nvmlReturn_t r = device_state(device, &s, &g);
    if (r != NVML_SUCCESS) return r;
    if (!temp || sensor != 0) return NVML_ERROR_INVALID_ARGUMENT; /* 0: NVML_TEMPERATURE_GPU */
    if (!g->has_temp) return NVML_ERROR_NOT_SUPPORTED;
    *temp = g->temp;
    return NVML_SUCCESS;
}

nvmlReturn_t nvmlDeviceGetPowerUsage(nvmlDevice_t device, unsigned int *power) {
    struct state s;
    struct gpu *g;
    nvmlReturn_t r = device_state(device, &s, &g);
    if (r != NVML_SUCCESS) return r;
    if (!power) return NVML_ERROR_INVALID_ARGUMENT;
    if (!g->has_power) return NVML_ERROR_NOT_SUPPORTED;
    *power = g->power_mw;
    return NVML_SUCCESS;
}

nvmlReturn_t nvmlDeviceGetComputeRunningProcesses_v3(nvmlDevice_t device, unsigned int *count,
                                                     nvmlProcessInfo_t *infos) {
    struct state s;
    struct gpu *g;
    nvmlReturn_t r = device_state(device, &s, &g);
    if (r != NVML_SUCCESS) return r;
    if (!count) return NVML_ERROR_INVALID_ARGUMENT;
    unsigned int mine = 0;
    for (unsigned int i = 0; i < s.nmatches; i++) mine += s.matches[i].gpu == device->index;
    /* As the driver: the needed count when the buffer is too small. */
    if (*count < mine || (!infos && mine)) {
        *count = mine;
        return NVML_ERROR_INSUFFICIENT_SIZE;
    }
    unsigned int n = 0;
    for (unsigned int i = 0; i < s.nmatches; i++) {
        if (s.matches[i].gpu != device->index) continue;
        infos[n].pid = s.matches[i].pid;
        infos[n].usedGpuMemory = s.matches[i].mib * MIB;
        infos[n].gpuInstanceId = NO_INSTANCE;
        infos[n].computeInstanceId = NO_INSTANCE;
        n++;
    }
    *count = n;
    return NVML_SUCCESS;
}

/* Nothing draws here. */
nvmlReturn_t nvmlDeviceGetGraphicsRunningProcesses_v3(nvmlDevice_t device, unsigned int *count,
                                                      nvmlProcessInfo_t *infos) {
    struct state s;
    struct gpu *g;
    (void)infos;
    nvmlReturn_t r = device_state(device, &s, &g);
    if (r != NVML_SUCCESS) return r;
    if (!count) return NVML_ERROR_INVALID_ARGUMENT;
    *count = 0;
    return NVML_SUCCESS;
}
