/* check.h: the status check shared by the C test programs. CHECK(call) runs an svft_* call and,
 * if it does not return SVFT_STATUS_OK, prints the call, its status and svft_last_error, then
 * exits 1. Include after svft.h. */
#pragma once
#include <stdio.h>
#include <stdlib.h>

#define CHECK(call)                                                              \
    do {                                                                         \
        SvftStatus st_ = (call);                                                 \
        if (st_ != SVFT_STATUS_OK) {                                             \
            char msg_[512];                                                      \
            svft_last_error(msg_, sizeof msg_, NULL);                            \
            fprintf(stderr, "%s:%d: %s -> %d: %s\n", __FILE__, __LINE__, #call,  \
                    (int)st_, msg_);                                             \
            exit(1);                                                             \
        }                                                                        \
    } while (0)
