/*
 * zero_agent: the zero-latency agent of the benchmarks.
 *
 * It answers like `qchat-sim ... "@sim:profile=instant PROMPT"` (one line,
 * "ok") without an interpreter to start, so that what a caller adds to a
 * call stands out from what the agent costs. It understands two of the
 * simulator's directives, read from its last argument (the prompt):
 *
 *   @sim:latency=SECONDS      sleep before answering (a fixed-latency agent)
 *   @sim:stdout_bytes=N       N filler bytes after the answer (N: plain bytes)
 *
 * Everything else in the prompt is ignored; stdin is not read.
 */

#define _POSIX_C_SOURCE 200809L

#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

static const char *directive(const char *prompt, const char *key)
{
    const char *found = strstr(prompt, key);
    return found ? found + strlen(key) : NULL;
}

static void sleep_seconds(double seconds)
{
    struct timespec wait;

    if (seconds <= 0)
        return;
    wait.tv_sec = (time_t)seconds;
    wait.tv_nsec = (long)((seconds - (double)wait.tv_sec) * 1e9);
    while (nanosleep(&wait, &wait) != 0)
        ;
}

static int write_all(const char *data, size_t size)
{
    while (size > 0) {
        ssize_t written = write(STDOUT_FILENO, data, size);
        if (written < 0)
            return -1;
        data += written;
        size -= (size_t)written;
    }
    return 0;
}

static int write_filler(long long size)
{
    static char block[65536];

    memset(block, 'x', sizeof block);
    while (size > 0) {
        size_t chunk = size < (long long)sizeof block ? (size_t)size : sizeof block;
        if (write_all(block, chunk) != 0)
            return -1;
        size -= (long long)chunk;
    }
    return 0;
}

int main(int argc, char **argv)
{
    const char *prompt = argc > 1 ? argv[argc - 1] : "";
    const char *latency = directive(prompt, "@sim:latency=");
    const char *filler = directive(prompt, "@sim:stdout_bytes=");

    if (latency)
        sleep_seconds(strtod(latency, NULL));
    if (write_all("ok\n", 3) != 0)
        return 1;
    if (filler && write_filler(strtoll(filler, NULL, 10)) != 0)
        return 1;
    return 0;
}
