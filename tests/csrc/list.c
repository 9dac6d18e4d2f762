#include <stdlib.h>

#include "csrc.h"

const int list_variant = CASFS_VARIANT;

struct node {
    struct node *next;
    int value;
};

struct node *csrc_list_push(struct node *head, int value)
{
    struct node *n = malloc(sizeof(*n));
    if (!n)
        return head;
    n->next = head;
    n->value = value;
    return n;
}

struct node *csrc_list_reverse(struct node *head)
{
    struct node *prev = NULL;
    while (head) {
        struct node *next = head->next;
        head->next = prev;
        prev = head;
        head = next;
    }
    return prev;
}

long csrc_list_sum(const struct node *head)
{
    long s = 0;
    for (; head; head = head->next)
        s += head->value;
    return s;
}

void csrc_list_free(struct node *head)
{
    while (head) {
        struct node *next = head->next;
        free(head);
        head = next;
    }
}
