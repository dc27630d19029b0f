#include <cstdio>
int main() { std::puts("muonps"); return 0; }
