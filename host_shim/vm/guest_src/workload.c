/*
 * ovmf-mh test-guest workload: keeps rewriting a known pattern into a
 * sizeable region of guest memory, verifies every page before rewriting
 * it, and prints a heartbeat line on the console once a second.
 *
 *   workload MIB PAGES_PER_TICK TICK_MS [ABA_PAGES]
 *
 * Every page holds words derived from (page number, generation); the
 * generation of each page lives in guest memory too. A page that does not
 * hold the pattern of its recorded generation is reported as CORRUPTION.
 *
 * With ABA_PAGES > 0 it also keeps that many further pages at a fixed
 * content A and, for half of every tick, flips them one after the other:
 * each is checked to hold A, overwritten with B (every word inverted), then
 * written back to A. A page read mid-flip holds B or a mix, yet its final
 * content equals what it held before: a comparison of old and new bytes
 * calls it unchanged. Live migration must still resend it.
 *
 * Output lines (serial console):
 *   WORKLOAD START mib=.. pages=.. aba=..
 *   HB seq=.. sweeps=.. verified=.. aba=.. errors=..
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

/* Content A of ABA page n: never a pattern() of the main region's pages. */
static uint64_t aba_word(uint64_t page, uint64_t word)
{
    return pattern(page | (1ULL << 40), 0, word);
}

/* Check that page n holds A, write B over it, then A again. Returns 1 on a mismatch. */
static int aba_flip(uint64_t *words, uint64_t n)
{
    int bad = 0;
    for (uint64_t w = 0; w < PAGE_WORDS; w++) {
        if (words[w] != aba_word(n, w)) {
            bad = 1;
        }
        ((volatile uint64_t *)words)[w] = ~aba_word(n, w);
    }
    for (uint64_t w = 0; w < PAGE_WORDS; w++) {
        ((volatile uint64_t *)words)[w] = aba_word(n, w);
    }
    return bad;
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
    uint64_t aba_pages = argc > 4 ? strtoull(argv[4], NULL, 0) : 0;
    uint64_t pages = mib * 256;
    uint64_t *aba = NULL, aba_cursor = 0, aba_flips = 0;
    uint64_t *region = mmap(NULL, pages * 4096, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    uint32_t *gen = calloc(pages, sizeof(uint32_t));
    uint64_t cursor = 0, verified = 0, errors = 0, seq = 0, sweeps = 0;
    double next_beat;
    struct timespec tick = { (time_t)(tick_ms / 1000), (long)(tick_ms % 1000) * 1000000L };

    if (region == MAP_FAILED || gen == NULL) {
        printf("WORKLOAD FAILED to allocate %llu MiB\n", (unsigned long long)mib);
        return 1;
    }
    if (aba_pages > 0) {
        aba = mmap(NULL, aba_pages * 4096, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        if (aba == MAP_FAILED) {
            printf("WORKLOAD FAILED to allocate %llu ABA pages\n", (unsigned long long)aba_pages);
            return 1;
        }
        for (uint64_t n = 0; n < aba_pages; n++) {
            for (uint64_t w = 0; w < PAGE_WORDS; w++) {
                aba[n * PAGE_WORDS + w] = aba_word(n, w);
            }
        }
        /* Busy half of each tick, asleep the other half. */
        tick.tv_sec = (time_t)(tick_ms / 2000);
        tick.tv_nsec = (long)((tick_ms * 500000ULL) % 1000000000ULL);
    }
    setvbuf(stdout, NULL, _IOLBF, 0);
    printf("WORKLOAD START mib=%llu pages=%llu aba=%llu\n", (unsigned long long)mib, (unsigned long long)pages,
           (unsigned long long)aba_pages);
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
            printf("HB seq=%llu sweeps=%llu verified=%llu aba=%llu errors=%llu\n", (unsigned long long)seq++,
                   (unsigned long long)sweeps, (unsigned long long)verified, (unsigned long long)aba_flips,
                   (unsigned long long)errors);
            next_beat += 1.0;
        }
        if (aba_pages > 0) {
            double until = now() + tick_ms / 2000.0;
            while (now() < until) {
                if (aba_flip(aba + aba_cursor * PAGE_WORDS, aba_cursor)) {
                    if (errors < 20) {
                        printf("CORRUPTION aba page=%llu\n", (unsigned long long)aba_cursor);
                    }
                    errors++;
                }
                aba_flips++;
                aba_cursor = (aba_cursor + 1) % aba_pages;
            }
        }
        nanosleep(&tick, NULL);
    }
}
