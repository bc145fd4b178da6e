/* Runs an ONNX model in onnxruntime's CPU session, one sample at a time, for bench_linux.py.
 *
 *   ort_driver LIBONNXRUNTIME MODEL INPUT OUTPUT N C H W [int8]
 *
 * INPUT: N samples of float32 1 x C x H x W, back to back; OUTPUT: every output of every run, float32, in order.
 * "int8": session.qdqisint8allowed=1 (every QDQ op an integer kernel; onnxruntime's default on ARM).
 * One intra-op and one inter-op thread, all graph optimisations (onnxruntime's default).
 *
 * The library is opened with dlopen and the C API is reached through OrtGetApiBase()->GetApi(5):
 * OrtApi is a table of function pointers whose order onnxruntime never changes once a version has
 * shipped (every entry used here is in versions 1-5), so the slots are indexed here instead of
 * including onnxruntime's header.
 */
#include <dlfcn.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

typedef void (*fn)(void); /* the generic function pointer type: casts from it are warning-free */
typedef struct { const fn *(*GetApi)(uint32_t version); const char *(*GetVersionString)(void); } ApiBase;

/* slots of OrtApi (0-based) */
enum { GET_ERROR_MESSAGE = 2, CREATE_ENV = 3, CREATE_SESSION = 7, RUN = 9, CREATE_SESSION_OPTIONS = 10,
       SET_GRAPH_OPT_LEVEL = 23, SET_INTRA_OP_THREADS = 24, SET_INTER_OP_THREADS = 25, SESSION_GET_INPUT_COUNT = 30,
       SESSION_GET_OUTPUT_COUNT = 31, SESSION_GET_INPUT_NAME = 36, SESSION_GET_OUTPUT_NAME = 37,
       CREATE_TENSOR_WITH_DATA = 49, GET_TENSOR_MUTABLE_DATA = 51, GET_TENSOR_ELEMENT_TYPE = 60,
       GET_TENSOR_SHAPE_ELEMENT_COUNT = 64, GET_TENSOR_TYPE_AND_SHAPE = 65, CREATE_CPU_MEMORY_INFO = 69,
       GET_DEFAULT_ALLOCATOR = 78, RELEASE_VALUE = 96, RELEASE_TENSOR_TYPE_AND_SHAPE = 99,
       ADD_SESSION_CONFIG_ENTRY = 130 };

static const fn *api;

typedef void *status_t;
#define CALL(slot, type, ...) (((type)api[slot])(__VA_ARGS__))

static void check(status_t st, const char *what) {
    if (st) {
        fprintf(stderr, "ort_driver: %s failed: %s\n", what,
                CALL(GET_ERROR_MESSAGE, const char *(*)(status_t), st));
        exit(2);
    }
}

int main(int argc, char **argv) {
    if (argc < 9) {
        fprintf(stderr, "usage: ort_driver LIBONNXRUNTIME MODEL INPUT OUTPUT N C H W [int8]\n");
        return 1;
    }
    void *lib = dlopen(argv[1], RTLD_NOW);
    if (!lib) { fprintf(stderr, "ort_driver: %s\n", dlerror()); return 1; }
    const ApiBase *(*get_base)(void) = (const ApiBase *(*)(void))dlsym(lib, "OrtGetApiBase");
    if (!get_base) { fprintf(stderr, "ort_driver: no OrtGetApiBase in %s\n", argv[1]); return 1; }
    api = get_base()->GetApi(5);
    if (!api) { fprintf(stderr, "ort_driver: C API version 5 not offered\n"); return 1; }
    int n = atoi(argv[5]);
    int64_t shape[4] = {1, atoll(argv[6]), atoll(argv[7]), atoll(argv[8])};
    int int8 = argc > 9 && strcmp(argv[9], "int8") == 0;

    void *env, *options, *session, *memory, *allocator;
    check(CALL(CREATE_ENV, status_t (*)(int, const char *, void **), 3, "bench", &env), "CreateEnv");
    check(CALL(CREATE_SESSION_OPTIONS, status_t (*)(void **), &options), "CreateSessionOptions");
    check(CALL(SET_INTRA_OP_THREADS, status_t (*)(void *, int), options, 1), "SetIntraOpNumThreads");
    check(CALL(SET_INTER_OP_THREADS, status_t (*)(void *, int), options, 1), "SetInterOpNumThreads");
    check(CALL(SET_GRAPH_OPT_LEVEL, status_t (*)(void *, int), options, 99), "SetSessionGraphOptimizationLevel");
    if (int8)
        check(CALL(ADD_SESSION_CONFIG_ENTRY, status_t (*)(void *, const char *, const char *), options,
                   "session.qdqisint8allowed", "1"), "AddSessionConfigEntry");
    check(CALL(CREATE_SESSION, status_t (*)(void *, const char *, void *, void **), env, argv[2], options, &session),
          "CreateSession");
    check(CALL(CREATE_CPU_MEMORY_INFO, status_t (*)(int, int, void **), 1, 0, &memory), "CreateCpuMemoryInfo");
    check(CALL(GET_DEFAULT_ALLOCATOR, status_t (*)(void **), &allocator), "GetAllocatorWithDefaultOptions");

    size_t n_in, n_out;
    check(CALL(SESSION_GET_INPUT_COUNT, status_t (*)(void *, size_t *), session, &n_in), "SessionGetInputCount");
    check(CALL(SESSION_GET_OUTPUT_COUNT, status_t (*)(void *, size_t *), session, &n_out), "SessionGetOutputCount");
    if (n_in != 1 || n_out > 16) { fprintf(stderr, "ort_driver: need 1 input, <= 16 outputs\n"); return 1; }
    char *in_name, *out_names[16];
    check(CALL(SESSION_GET_INPUT_NAME, status_t (*)(void *, size_t, void *, char **), session, 0, allocator,
               &in_name), "SessionGetInputName");
    for (size_t i = 0; i < n_out; i++)
        check(CALL(SESSION_GET_OUTPUT_NAME, status_t (*)(void *, size_t, void *, char **), session, i, allocator,
                   &out_names[i]), "SessionGetOutputName");

    FILE *f = fopen(argv[3], "rb");
    if (!f) { fprintf(stderr, "ort_driver: cannot read %s\n", argv[3]); return 1; }
    fseek(f, 0, SEEK_END);
    long bytes = ftell(f);
    fseek(f, 0, SEEK_SET);
    float *x = malloc((size_t)bytes);
    if (!x || fread(x, 1, (size_t)bytes, f) != (size_t)bytes) return 1;
    fclose(f);
    size_t per = (size_t)(shape[1] * shape[2] * shape[3]);
    if ((size_t)bytes != per * sizeof(float) * (size_t)n) { fprintf(stderr, "ort_driver: input size\n"); return 1; }

    FILE *out = fopen(argv[4], "wb");
    if (!out) { fprintf(stderr, "ort_driver: cannot write %s\n", argv[4]); return 1; }
    for (int s = 0; s < n; s++) {
        void *input, *outputs[16] = {0};
        check(CALL(CREATE_TENSOR_WITH_DATA, status_t (*)(void *, void *, size_t, const int64_t *, size_t, int, void **),
                   memory, x + (size_t)s * per, per * sizeof(float), shape, 4, 1, &input), "CreateTensor");
        const char *names[1] = {in_name};
        check(CALL(RUN, status_t (*)(void *, void *, const char *const *, void *const *, size_t, const char *const *,
                                     size_t, void **),
                   session, NULL, names, (void *const *)&input, 1, (const char *const *)out_names, n_out, outputs),
              "Run");
        for (size_t i = 0; i < n_out; i++) {
            void *info, *data;
            size_t count;
            int type;
            check(CALL(GET_TENSOR_TYPE_AND_SHAPE, status_t (*)(void *, void **), outputs[i], &info), "TypeAndShape");
            check(CALL(GET_TENSOR_SHAPE_ELEMENT_COUNT, status_t (*)(void *, size_t *), info, &count), "ElementCount");
            check(CALL(GET_TENSOR_ELEMENT_TYPE, status_t (*)(void *, int *), info, &type), "ElementType");
            CALL(RELEASE_TENSOR_TYPE_AND_SHAPE, void (*)(void *), info);
            if (type != 1) { fprintf(stderr, "ort_driver: output %zu is not float32\n", i); return 1; }
            check(CALL(GET_TENSOR_MUTABLE_DATA, status_t (*)(void *, void **), outputs[i], &data), "TensorData");
            fwrite(data, sizeof(float), count, out);
            CALL(RELEASE_VALUE, void (*)(void *), outputs[i]);
        }
        CALL(RELEASE_VALUE, void (*)(void *), input);
    }
    fclose(out);
    return 0;
}
