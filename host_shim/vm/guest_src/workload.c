/*
 * ovmf-mh test-guest workload: keeps rewriting a known pattern into a
 * sizeable region of guest memory, verifies every page before rewriting
 * it, and prints a heartbeat line on the console once a second.
 *
 *   workload MIB PAGES_PER_TICK TICK_MS
 *
 * Every page holds words derived from (page number, generation); the
 * generation of each page lives in guest memory too. A page that does not
 * hold the pattern of its recorded generation is reported as CORRUPTION.
 * Output lines (serial console):
 *   WORKLOAD START mib=.. pages=..
 *   HB seq=.. gen=.. verified=.. errors=..
 *   CORRUPTION page=.. gen=.. word=.. expected=.. got=..
 *
 * SPDX-License-Identifier: BSD-2-Clause-Patent
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <time.h>

#define PAGE_WORDS 512

static uint64_t pattern(uint64_t page, uint64_t gen, uint64_t word)
{
    uint64_t x = (page << 32) ^ (gen * 0x9E3779B97F4A7C15ULL) ^ (word * 0xBF58476D1CE4E5B9ULL);
    x ^= x >> 31;
    x *= 0x94D049BB133111EBULL;
    return x ^ (x >> 29);
}

static double now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

int main(int argc, char **argv)
{
    uint64_t mib = argc > 1 ? strtoull(argv[1], NULL, 0) : 64;
    uint64_t per_tick = argc > 2 ? strtoull(argv[2], NULL, 0) : 256;
    uint64_t tick_ms = argc > 3 ? strtoull(argv[3], NULL, 0) : 50;
    uint64_t pages = mib * 256;
    uint64_t *region = mmap(NULL, pages * 4096, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    uint32_t *gen = calloc(pages, sizeof(uint32_t));
    uint64_t cursor = 0, verified = 0, errors = 0, seq = 0, sweeps = 0;
    double next_beat;
    struct timespec tick = { (time_t)(tick_ms / 1000), (long)(tick_ms % 1000) * 1000000L };

    if (region == MAP_FAILED || gen == NULL) {
        printf("WORKLOAD FAILED to allocate %llu MiB\n", (unsigned long long)mib);
        return 1;
    }
    setvbuf(stdout, NULL, _IOLBF, 0);
    printf("WORKLOAD START mib=%llu pages=%llu\n", (unsigned long long)mib, (unsigned long long)pages);
    next_beat = now() + 1.0;
    for (;;) {
        for (uint64_t n = 0; n < per_tick; n++, cursor = (cursor + 1) % pages) {
            uint64_t *words = region + cursor * PAGE_WORDS;
            if (gen[cursor] != 0) {
                for (uint64_t w = 0; w < PAGE_WORDS; w++) {
                    uint64_t expected = pattern(cursor, gen[cursor], w);
                    if (words[w] != expected) {
                        if (errors < 20) {
                            printf("CORRUPTION page=%llu gen=%u word=%llu expected=%016llx got=%016llx\n",
                                   (unsigned long long)cursor, gen[cursor], (unsigned long long)w,
                                   (unsigned long long)expected, (unsigned long long)words[w]);
                        }
                        errors++;
                        break;
                    }
                }
                verified++;
            }
            gen[cursor]++;
            for (uint64_t w = 0; w < PAGE_WORDS; w++) {
                words[w] = pattern(cursor, gen[cursor], w);
            }
            if (cursor == pages - 1) {
                sweeps++;
            }
        }
        if (now() >= next_beat) {
            printf("HB seq=%llu sweeps=%llu verified=%llu errors=%llu\n", (unsigned long long)seq++,
                   (unsigned long long)sweeps, (unsigned long long)verified, (unsigned long long)errors);
            next_beat += 1.0;
        }
        nanosleep(&tick, NULL);
    }
}
