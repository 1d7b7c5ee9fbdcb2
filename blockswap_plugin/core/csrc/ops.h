// Functions of the compiled CPU helpers; module.cpp binds them to Python.
#pragma once

#include <torch/extension.h>

#include <cstdint>
#include <map>
#include <string>
#include <vector>

// bn_relu_cpu.cpp: batch norm (training) + ReLU.
std::vector<torch::Tensor> bn_relu_forward(torch::Tensor x, torch::Tensor weight, torch::Tensor bias, double eps);
torch::Tensor bn_relu_backward(torch::Tensor dy, torch::Tensor x, torch::Tensor mean, torch::Tensor invstd,
                               torch::Tensor weight, torch::Tensor bias);
// relu(batch norm(x)) with given batch statistics: the same bits as the forward pass gave.
torch::Tensor bn_relu_apply(torch::Tensor x, torch::Tensor mean, torch::Tensor invstd, torch::Tensor weight,
                            torch::Tensor bias);
// Per sample and channel (N x C, float): the sum over positions of a * g.
torch::Tensor fisher_terms(torch::Tensor a, torch::Tensor g);

// block_cache_cpu.cpp: a cache of large CPU blocks behind torch's CPU allocator.
bool block_cache_enable(int64_t limit_bytes, bool huge_pages);
void block_cache_disable();
void block_cache_release();
std::map<std::string, int64_t> block_cache_stats();
